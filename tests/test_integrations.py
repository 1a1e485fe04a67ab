"""trp.integrations: the Hugging Face Trainer and Lightning callbacks on tiny runs (CPU, a few optimizer
steps, gradient accumulation 2): projection once per optimizer step, the nuclear-norm term on the
accumulated gradients exactly once per optimizer step, exact resume from the run's own checkpoint with the
pruner state, decomposition at the end that reproduces the projected model, and the misuse errors."""
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from trp.core.schemes import to_matrix

LAYERS = ["conv2", "fc1"]   # explicit: independent of the default selection


class TinyNet(nn.Module):
    """Two convs and two Linear layers; returns the loss when given labels (as Trainer wants)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 9, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x, labels=None):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        logits = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 3).flatten(1))))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_pruner_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert (sa["steps"], sa["last_projected"], sa["ranks"]) == (sb["steps"], sb["last_projected"], sb["ranks"])
    assert sa["warm_bases"].keys() == sb["warm_bases"].keys()
    for k in sa["warm_bases"]:
        assert torch.equal(sa["warm_bases"][k], sb["warm_bases"][k]), k


def _svd_polar(weight, scheme, k):
    """U_k V_k^T of the weight's matrix (float64): the subgradient regularize() adds, times `nuclear`."""
    U, _, Vh = torch.linalg.svd(to_matrix(weight.detach(), scheme).double(), full_matrices=False)
    return U[:, :k] @ Vh[:k]


def _rank(W, rel=1e-5):
    """Numerical rank of a weight's matrix (channel scheme)."""
    s = torch.linalg.svdvals(to_matrix(W.detach(), "channel").double())
    return int((s > rel * s[0]).sum())


def _assert_low_rank(weights, ranks):
    """Every {name: weight} has exactly the pruner's rank, below its full rank."""
    for name, k in ranks.items():
        W = weights[name]
        assert k < min(to_matrix(W, "channel").shape), f"{name}: rank {k} is not a reduction"
        assert _rank(W) == k, f"{name}: not of rank {k} after the projection"


def _weights(model, names):
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() for n in names}


def _compare_decomposed(dense, compact, x):
    with torch.no_grad():
        ref, out = dense(x)["logits"], compact(x)["logits"]
    err = float((out - ref).norm() / ref.norm())
    assert err <= 1e-4, err


def test_import_trp_imports_no_framework_and_a_missing_one_is_named():
    script = """
import sys
sys.modules["lightning"] = None          # as if lightning were not installed
import trp
print("frameworks:", sorted(m for m in ("transformers", "lightning", "accelerate") if sys.modules.get(m)))
try:
    trp.integrations.TRPLightningCallback
except ImportError as exc:
    print("error:", exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "frameworks: []" in out.stdout
    assert "error: trp.integrations.TRPLightningCallback needs lightning: pip install 'trp[lightning]'" in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'TRPNothing'"):
        trp.integrations.TRPNothing


def test_callbacks_refuse_bad_arguments_before_training():
    from trp.integrations.common import StepDriver
    model = TinyNet()
    pruner = trp.RankPruner(model, layers=LAYERS)
    with pytest.raises(ValueError, match="give a pruner or RankPruner options \\(energy\\), not both"):
        StepDriver("X", pruner, {"energy": 0.5})
    with pytest.raises(TypeError, match="pruner must be a trp.RankPruner, got TinyNet"):
        StepDriver("X", model)
    with pytest.raises(TypeError, match="^X: not a RankPruner option: .*'enrgy'"):
        StepDriver("X", None, {"enrgy": 0.5})
    with pytest.raises(ValueError, match="^X: decompose_at_end must be None, 'ranks'"):
        StepDriver("X", None, {}, decompose_at_end="rank")
    with pytest.raises(ValueError, match="exactly one rank criterion"):
        StepDriver("X", None, {}, decompose_at_end={"energy": 0.9, "rank": 2})
    with pytest.raises(ValueError, match="energy must be"):
        StepDriver("X", None, {}, decompose_at_end={"energy": 1.5})
    driver = StepDriver("X", pruner)
    with pytest.raises(ValueError, match="X: the pruner was built for another model"):
        driver.attach(TinyNet())
    with pytest.raises(RuntimeError, match="an optimizer step without a training batch before it"):
        driver.before_optimizer_step()
    driver.attach(model)
    driver.begin_step()
    with pytest.raises(RuntimeError, match="none of the pruned weights has a gradient at the optimizer step"):
        driver.before_optimizer_step()  # a backward pass ran through another model, none through this one
    model(torch.zeros(1, 3, 6, 6), torch.zeros(1, dtype=torch.long))["loss"].backward()
    driver.before_optimizer_step()
    assert not driver.open and pruner.steps == 1


# --- Hugging Face Trainer ---------------------------------------------------------------------------------

def _hf():
    return pytest.importorskip("transformers")


class _HFDataset(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x, self.y = _data(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(out, callbacks, max_steps=4, resume=None, init_seed=0, model=None, model_init=None, **overrides):
    transformers = _hf()
    torch.manual_seed(init_seed)
    model = TinyNet() if model is None and model_init is None else model
    kwargs = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_steps=max_steps, learning_rate=0.01, lr_scheduler_type="constant", save_strategy="no",
                  logging_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    trainer = transformers.Trainer(model=model, model_init=model_init, args=transformers.TrainingArguments(**kwargs),
                                   train_dataset=_HFDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _hf_probe():
    """A TrainerCallback that records, around the TRP callback, what each hook sees."""
    transformers = _hf()

    class Probe(transformers.TrainerCallback):
        def __init__(self, model_fn):
            self.model_fn, self.grads, self.weights, self.steps = model_fn, [], [], 0

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.steps += 1
            self.weights.append(_params(model))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    return Probe


def test_trainer_callback_projects_once_per_optimizer_step(tmp_path):
    from trp.integrations import TRPTrainerCallback
    Probe = _hf_probe()
    cb = TRPTrainerCallback(energy=0.8, period=2, nuclear=0.0, layers=LAYERS)
    after = Probe(None)
    model, trainer = _hf_run(tmp_path, [cb, after], max_steps=5)
    # 5 optimizer steps of 2 micro-batches: 5 step() calls, projections at steps 0, 2, 4
    assert trainer.state.global_step == 5 and after.steps == 5
    assert cb.pruner.steps == 5 and cb.pruner.last_projected
    ranks = cb.pruner.ranks
    assert set(ranks) == set(LAYERS) and all(r is not None for r in ranks.values())
    _assert_low_rank({n: after.weights[4][f"{n}.weight"] for n in LAYERS}, ranks)
    # a step that did not project keeps the optimizer's (full-rank) update
    assert _rank(after.weights[1]["fc1.weight"], 1e-3) > ranks["fc1"]


def test_trainer_callback_adds_the_nuclear_term_once_per_optimizer_step(tmp_path):
    from trp.integrations import TRPTrainerCallback
    nuclear = 0.05
    before, after = _hf_probe()(None), _hf_probe()(None)
    cb = TRPTrainerCallback(energy=0.8, period=2, nuclear=nuclear, layers=LAYERS)
    _hf_run(tmp_path / "a", [before, cb, after], max_steps=4)
    # the same first step without the nuclear term: the accumulated gradients hold no nuclear term yet
    ref_before, ref_after = _hf_probe()(None), _hf_probe()(None)
    _hf_run(tmp_path / "b", [ref_before, TRPTrainerCallback(energy=0.8, period=2, nuclear=0.0, layers=LAYERS),
                             ref_after], max_steps=1)
    # (the projections of the two runs may differ in the last bits: the nuclear term is ~1e-3 here)
    for n in ref_before.grads[0]:
        torch.testing.assert_close(before.grads[0][n], ref_before.grads[0][n], rtol=0, atol=1e-7)
        assert torch.equal(ref_after.grads[0][n], ref_before.grads[0][n])
    assert len(before.grads) == len(after.grads) == 4
    k = cb.pruner.ranks
    for step in range(4):
        for n in LAYERS:
            added = to_matrix(after.grads[step][f"{n}.weight"] - before.grads[step][f"{n}.weight"], "channel")
            if step % 2 == 0:  # projecting steps (nuclear_every="projection"): nuclear * U_k V_k^T, once
                W = after.weights[step][f"{n}.weight"]
                assert step != 2 or _rank(W) == k[n]
                expected = nuclear * _svd_polar(W, "channel", _rank(W))
                torch.testing.assert_close(added.double(), expected, rtol=0, atol=2e-6)
            else:
                assert float(added.abs().max()) == 0.0
        for n in ("conv1.weight", "fc2.weight", "fc1.bias"):  # not selected: untouched
            assert torch.equal(after.grads[step][n], before.grads[step][n])


class _StopAt:
    """Makes a TrainerCallback that stops training after optimizer step `at` (a run cut short)."""

    def __new__(cls, at):
        transformers = _hf()

        class Stop(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    control.should_training_stop = True

        return Stop()


def test_trainer_callback_resumes_exactly_from_its_own_checkpoint(tmp_path):
    from trp.integrations import TRPTrainerCallback
    # period 3 over 6 steps, stopped after step 2 (mid-epoch): a pruner restarted from zero would project
    # at steps 2 and 5 instead of 3, and without its warm-start bases
    opts = dict(energy=0.8, period=3, nuclear=1e-2, layers=LAYERS)
    save = dict(save_strategy="steps", save_steps=2)
    full_cb = TRPTrainerCallback(**opts)
    full, _ = _hf_run(tmp_path / "full", [full_cb], max_steps=6, **save)
    cut_cb = TRPTrainerCallback(**opts)
    _hf_run(tmp_path / "cut", [cut_cb, _StopAt(2)], max_steps=6, **save)
    assert cut_cb.pruner.steps == 2
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoint-2")).count("trp_pruner.pt") == 1
    resumed_cb = TRPTrainerCallback(**opts)
    resumed, trainer = _hf_run(tmp_path / "cut", [resumed_cb], max_steps=6, resume=True, init_seed=1,
                                 **save)
    assert trainer.state.global_step == 6
    for n, p in _params(full).items():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), n
    _assert_same_pruner_state(full_cb.pruner, resumed_cb.pruner)


def test_trainer_callback_refuses_a_checkpoint_without_or_with_foreign_pruner_state(tmp_path):
    from trp.integrations import TRPTrainerCallback
    from trp.integrations.common import StepDriver
    save = dict(save_strategy="steps", save_steps=2)
    opts = dict(energy=0.8, layers=LAYERS)
    _hf_run(tmp_path / "plain", [_StopAt(2)], max_steps=4, **save)  # checkpoint-2 without the callback
    with pytest.raises(ValueError, match="checkpoint-2 has no pruner state \\(trp_pruner.pt\\): it was saved "
                                         "without TRPTrainerCallback"):
        _hf_run(tmp_path / "plain", [TRPTrainerCallback(**opts)], max_steps=4, resume=True, **save)
    # resuming from a folder outside output_dir: the callback cannot know where that is
    with pytest.raises(ValueError, match="resumes at step 2, but .*checkpoint-2 does not exist"):
        _hf_run(tmp_path / "elsewhere", [TRPTrainerCallback(**opts)], max_steps=4,
                resume=str(tmp_path / "plain" / "checkpoint-2"), **save)
    # a pruner state saved with other weights (another run's file copied in) is refused
    other = TinyNet()
    driver = StepDriver("TRPTrainerCallback", trp.RankPruner(other, **opts))
    driver.pruner.steps = 2
    driver.save_state(tmp_path / "plain" / "checkpoint-2" / "trp_pruner.pt", 2)
    with pytest.raises(ValueError, match="was saved with other weights than the model resumes with"):
        _hf_run(tmp_path / "plain", [TRPTrainerCallback(**opts)], max_steps=4, resume=True, **save)
    # a damaged one too
    path = tmp_path / "plain" / "checkpoint-2" / "trp_pruner.pt"
    payload = torch.load(path, weights_only=True)
    payload["step"] = 3
    torch.save(payload, path)
    with pytest.raises(ValueError, match="corrupted: its contents do not match its checksum"):
        _hf_run(tmp_path / "plain", [TRPTrainerCallback(**opts)], max_steps=4, resume=True, **save)


def test_trainer_callback_refuses_a_model_without_selected_layers_and_bad_setups(tmp_path):
    from trp.integrations import TRPTrainerCallback
    from trp.integrations.huggingface import check_training_args

    with pytest.raises(ValueError, match="^TRPTrainerCallback: RankPruner: no layer selected"):
        _hf_run(tmp_path, [TRPTrainerCallback(layers=LAYERS, exclude=LAYERS)])
    # model_init=: the Trainer hands its callbacks the model it trains (the pruner's weights get gradients)
    _hf_run(tmp_path, [TRPTrainerCallback(layers=LAYERS)], model_init=TinyNet, max_steps=1)
    state = types.SimpleNamespace(is_hyper_param_search=False)
    args = types.SimpleNamespace(deepspeed=None, fsdp=None, fp16=True, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="fp16 training needs max_grad_norm > 0"):
        check_training_args(args, state)
    check_training_args(types.SimpleNamespace(**{**vars(args), "max_grad_norm": 1.0}), state)
    with pytest.raises(ValueError, match="DeepSpeed and FSDP are not supported"):
        check_training_args(types.SimpleNamespace(**{**vars(args), "deepspeed": "ds.json"}), state)
    with pytest.raises(ValueError, match="hyperparameter search is not supported"):
        check_training_args(args, types.SimpleNamespace(is_hyper_param_search=True))


def test_trainer_callback_decomposes_at_the_pruner_ranks_at_the_end(tmp_path):
    from trp.integrations import TRPTrainerCallback
    cb = TRPTrainerCallback(energy=0.8, period=1, nuclear=1e-2, layers=LAYERS, decompose_at_end="ranks")
    model, _ = _hf_run(tmp_path, [cb], max_steps=3)
    _assert_low_rank(_weights(model, LAYERS), cb.pruner.ranks)  # the final projection: the model TRP training ends with
    layers = trp.factorized_layers(cb.compact)
    assert set(layers) == set(LAYERS)
    x, _ = _data(8)
    _compare_decomposed(model, cb.compact, x)
    saved = trp.load(tmp_path / "decomposed.pt", base=TinyNet())
    _compare_decomposed(model, saved, x)
    assert set(trp.factorized_layers(saved)) == set(LAYERS)


# --- Lightning --------------------------------------------------------------------------------------------

def _pl():
    return pytest.importorskip("lightning.pytorch")


def _lit_module(manual=False):
    L = _pl()

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()
            self.automatic_optimization = not manual

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.net(x, y)["loss"]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    return Lit()


PL_LAYERS = [f"net.{n}" for n in LAYERS]


def _pl_run(root, callbacks, max_epochs=1, ckpt=None, module=None, init_seed=0, **overrides):
    L = _pl()
    torch.manual_seed(init_seed)
    module = _lit_module() if module is None else module
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    kwargs = dict(default_root_dir=str(root), max_epochs=max_epochs, accumulate_grad_batches=2, accelerator="cpu",
                  devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, deterministic=True)
    kwargs.update(overrides)
    trainer = L.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module, trainer


def _pl_probe():
    L = _pl()

    class Probe(L.Callback):
        def __init__(self):
            self.grads, self.weights, self.batches = [], [], 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches += 1
            self.weights.append(_params(pl_module.net))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()})

    return Probe


def test_lightning_callback_projects_and_adds_the_nuclear_term_once_per_optimizer_step(tmp_path):
    from trp.integrations import TRPLightningCallback
    Probe = _pl_probe()
    nuclear = 0.05
    before, after = Probe(), Probe()
    cb = TRPLightningCallback(energy=0.8, period=2, nuclear=nuclear, layers=PL_LAYERS)
    _, trainer = _pl_run(tmp_path, [before, cb, after], max_epochs=1)
    # 8 micro-batches, accumulate 2: 4 optimizer steps, projections at steps 0 and 2
    assert trainer.global_step == 4 and after.batches == 8 and len(after.grads) == 4
    assert cb.pruner.steps == 4 and not cb.pruner.last_projected
    ranks = {n.removeprefix("net."): k for n, k in cb.pruner.ranks.items()}
    for step in range(4):
        W = after.weights[2 * step]  # at the first micro-batch of the step, after step()
        for n in LAYERS:
            added = to_matrix(after.grads[step][f"{n}.weight"] - before.grads[step][f"{n}.weight"], "channel")
            if step % 2 == 0:
                k = _rank(W[f"{n}.weight"])
                assert k < min(added.shape) and (step != 2 or k == ranks[n])  # projected at this step
                expected = nuclear * _svd_polar(W[f"{n}.weight"], "channel", k)
                torch.testing.assert_close(added.double(), expected, rtol=0, atol=2e-6)
            else:
                assert float(added.abs().max()) == 0.0
        # the second micro-batch sees the same weights: no projection between micro-batches
        for n, w in W.items():
            assert torch.equal(w, after.weights[2 * step + 1][n]), n
    # the nuclear term is not in the accumulated gradients before the hook: the nuclear=0 run's first step
    ref = Probe()
    _pl_run(tmp_path / "ref", [TRPLightningCallback(energy=0.8, period=2, nuclear=0.0, layers=PL_LAYERS), ref],
            max_steps=1)
    for n, g in ref.grads[0].items():  # (equal to the last bits of the two runs' projections)
        torch.testing.assert_close(before.grads[0][n], g, rtol=0, atol=1e-7)


def test_lightning_callback_resumes_exactly_from_its_own_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from trp.integrations import TRPLightningCallback

    def checkpoints(root):
        return ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    opts = dict(energy=0.8, period=3, nuclear=1e-2, layers=PL_LAYERS)
    full_cb = TRPLightningCallback(**opts)
    full, _ = _pl_run(tmp_path / "full", [full_cb], max_epochs=2)
    cut_cb = TRPLightningCallback(**opts)
    _pl_run(tmp_path / "cut", [cut_cb, checkpoints(tmp_path / "cut")], max_epochs=1, enable_checkpointing=True)
    assert cut_cb.pruner.steps == 4  # 4 is not a multiple of the period: a restarted pruner would differ
    resumed_cb = TRPLightningCallback(**opts)
    resumed, trainer = _pl_run(tmp_path / "cut", [resumed_cb], max_epochs=2,
                               ckpt=str(tmp_path / "cut" / "epoch=0.ckpt"), init_seed=1)
    assert trainer.global_step == 8 and resumed_cb.pruner.steps == 8
    for n, p in _params(full).items():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), n
    _assert_same_pruner_state(full_cb.pruner, resumed_cb.pruner)


def test_lightning_callback_refuses_a_checkpoint_without_pruner_state_and_manual_optimization(tmp_path):
    from trp.integrations import TRPLightningCallback
    module, trainer = _pl_run(tmp_path, [], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="^TRPLightningCallback: the checkpoint has no pruner state"):
        _pl_run(tmp_path, [TRPLightningCallback(layers=PL_LAYERS)], max_epochs=2, ckpt=str(tmp_path / "plain.ckpt"))
    with pytest.raises(ValueError, match="^TRPLightningCallback: manual optimization is not supported"):
        _pl_run(tmp_path, [TRPLightningCallback(layers=PL_LAYERS)], module=_lit_module(manual=True),
                accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="^TRPLightningCallback: RankPruner: no layer selected"):
        _pl_run(tmp_path, [TRPLightningCallback(layers=PL_LAYERS, exclude=PL_LAYERS)])


def test_lightning_callback_refuses_a_fused_optimizer_under_a_grad_scaler():
    _pl()
    from lightning.pytorch.plugins.precision import MixedPrecision

    from trp.integrations.lightning import check_trainer
    params = [nn.Parameter(torch.zeros(2))]
    module = types.SimpleNamespace(automatic_optimization=True)

    def trainer(fused, scaler):
        precision = (MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")) if scaler
                     else MixedPrecision("bf16-mixed", "cpu"))
        return types.SimpleNamespace(precision_plugin=precision,
                                     optimizers=[torch.optim.AdamW(params, fused=fused)])

    with pytest.raises(ValueError, match="a fused optimizer \\(AdamW\\) unscales 16-mixed gradients inside its step"):
        check_trainer(trainer(True, True), module)
    check_trainer(trainer(False, True), module)  # unscaled by the plugin before the hook
    check_trainer(trainer(True, False), module)  # bf16: no scaling at all


def test_lightning_callback_decomposes_at_the_pruner_ranks_at_the_end(tmp_path):
    from trp.integrations import TRPLightningCallback
    cb = TRPLightningCallback(energy=0.8, period=1, nuclear=1e-2, layers=PL_LAYERS, decompose_at_end="ranks")
    module, _ = _pl_run(tmp_path, [cb], max_epochs=1)
    _assert_low_rank(_weights(module, PL_LAYERS), cb.pruner.ranks)
    assert set(trp.factorized_layers(cb.compact)) == set(PL_LAYERS)
    x, _ = _data(8)
    _compare_decomposed(module.net, cb.compact.net, x)
    saved = trp.load(tmp_path / "decomposed.pt", base=_lit_module())
    _compare_decomposed(module.net, saved.net, x)


def test_lightning_callback_decomposes_by_a_criterion_at_the_end(tmp_path):
    from trp.integrations import TRPLightningCallback
    path = tmp_path / "out" / "compact.pt"
    cb = TRPLightningCallback(energy=0.8, layers=PL_LAYERS, decompose_at_end={"rank": 2}, decomposed_path=path)
    module, _ = _pl_run(tmp_path, [cb], max_epochs=1)
    layers = trp.factorized_layers(trp.load(path, base=_lit_module()))
    assert {n: m.rank for n, m in layers.items()} == {n: 2 for n in PL_LAYERS}


# --- the guide's examples ---------------------------------------------------------------------------------

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "guides",
                     "integrations.md")


def _guide_examples():
    with open(GUIDE) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("framework", ["transformers", "lightning.pytorch"])
def test_the_guide_examples_run_and_decompose(framework, tmp_path, monkeypatch):
    pytest.importorskip(framework)
    (code,) = [c for c in _guide_examples() if f"import {framework}" in c or f"from {framework} import" in c]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "guide_example"}
    exec(compile(code, GUIDE, "exec"), namespace)
    cb = namespace["trp_cb"]
    assert cb.pruner.steps == 8  # the number the guide's comment states
    assert set(trp.factorized_layers(namespace["compact"])) == set(cb.pruner.layer_names)
    assert set(trp.factorized_layers(cb.compact)) == set(cb.pruner.layer_names)
