"""TRP under torch.distributed: the sharded projection on 2 gloo processes (bit-identical ranks, exact
ranks, equal to one process over the same global batch), `trp train --nproc 2` / torchrun, resume with
another process count, a killed worker, --amp and --channels-last."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import trp
from cli_helpers import TINY, run_cli
from trp.app import checkpoint as ckpt
from trp.app import config, train
from trp.core.schemes import to_matrix
from trp.prune import distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


# --- sharding rules (no processes) -------------------------------------------------------------------------

def test_heavy_groups_are_split_and_shared_by_cost_not_count():
    # group A: 4 layers of cost 10, B: 1 of cost 5, C: 3 of cost 1 (per layer); total 48, 24 per rank
    groups = [["a0", "a1", "a2", "a3"], ["b0"], ["c0", "c1", "c2"]]
    pieces, costs = distributed.split_heavy(groups, [10, 5, 1], 2)
    assert pieces == [["a0", "a1"], ["a2", "a3"], ["b0"], ["c0", "c1", "c2"]]
    assert costs == [20, 20, 5, 3]
    owners = distributed.assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [23, 25]  # by count (2 pieces each) the best split would be 40 / 8 or 25 / 23
    assert distributed.assign(costs, 2) == owners  # deterministic: every rank computes the same owners
    # one rank: nothing split; more ranks than layers: each group in at most len(layers) pieces
    assert distributed.split_heavy(groups, [10, 5, 1], 1)[0] == groups
    assert [len(p) for p in distributed.split_heavy(groups, [10, 5, 1], 8)[0]] == [1, 1, 1, 1, 1, 3]


def test_projection_cost_counts_every_matrix():
    assert distributed.projection_cost((16, 144)) == 16 * 144 * 16
    assert distributed.projection_cost((8, 4, 9)) == 8 * 4 * 9 * 4  # nd: 8 filters of 4 x 9


def test_pruner_takes_wrapped_models_and_checks_the_group():
    model = trp.models.build("resnet20", num_classes=10)
    names = trp.RankPruner(model).layer_names
    assert trp.RankPruner(nn.DataParallel(model)).layer_names == names
    assert trp.RankPruner(torch.compile(model)).layer_names == names  # compile is lazy: nothing compiles
    assert trp.RankPruner(model)._sharding is None  # no process group: one process, nothing to share
    with pytest.raises(TypeError, match="process_group"):
        trp.RankPruner(model, process_group="gloo")


def test_pruner_on_a_compiled_model_projects_what_the_graph_reads():
    torch.manual_seed(0)
    model = tiny_net()
    net = torch.compile(model, backend="aot_eager")
    pruner = trp.RankPruner(net, "channel", energy=0.5)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):  # the second projection changes the weights the compiled graph has already seen
        pruner.step()
        assert torch.allclose(net(x), model(x), atol=1e-6)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)


# --- 2 processes: the sharded projection --------------------------------------------------------------------

def tiny_net():
    """No BatchNorm: a DDP run over halves of a batch equals one process over the whole batch."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def global_batches(steps=STEPS, n=16):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)]


def sgd_trp_steps(net, model, pruner, batches):
    """The order of operations with DDP: step() (projection), forward, backward (all-reduce), regularize()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x, y in batches:
        pruner.step()
        yield "projected"
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        yield "regularized"
        opt.step()


def same_on_every_rank(tensors, what):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).contiguous()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for r, other in enumerate(gathered):
        assert torch.equal(other, flat), f"{what}: rank {dist.get_rank()} differs from rank {r}"


def cut_one_rank(pruner):
    """Cuts one rank off every layer above rank 1 (RankPruner's budget cut with a fixed decision), checking that
    every process is given the same spectra."""
    ranks = pruner.ranks

    def decide(spectra):
        if dist.is_initialized():
            same_on_every_rank([spectra[n] for n in pruner.layer_names], "spectra")
        return {n: r - 1 for n, r in ranks.items() if r > 1}

    pruner.engine.cut(decide)
    assert pruner.ranks == {n: max(r - 1, 1) for n, r in ranks.items()}


def _check_resnet(rank):
    """ResNet-20 (BatchNorm), different data per rank: bit-identical weights and gradient additions on
    every rank, and every projected layer exactly of the rank the pruner reports."""
    torch.manual_seed(0)
    model = trp.models.build("resnet20", num_classes=10)
    net = nn.parallel.DistributedDataParallel(model)
    pruner = trp.RankPruner(net, "channel", energy=0.9, nuclear=1e-3)
    owners = pruner._sharding.owners
    assert set(owners) == {0, 1} and len(owners) > 5  # the heavy 64-channel group was split
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(STEPS)]
    for phase in sgd_trp_steps(net, model, pruner, batches):
        if phase == "projected":
            same_on_every_rank(list(model.parameters()), "weights after step()")
            assert distributed.all_gather_objects(pruner.ranks) == [pruner.ranks] * 2
            for name, module in pruner.layers:
                k = torch.linalg.matrix_rank(to_matrix(module.weight.detach().double(), "channel"), rtol=1e-5)
                assert int(k) == pruner.ranks[name], name
        else:
            same_on_every_rank([p.grad for _, m in pruner.layers for p in [m.weight]], "gradients")
    cut_one_rank(pruner)  # the budget's cut: spectra exchanged, every rank decides and ends the same
    same_on_every_rank(list(model.parameters()), "weights after a cut")
    assert distributed.all_gather_objects(pruner.ranks) == [pruner.ranks] * 2
    for name, module in pruner.layers:
        k = torch.linalg.matrix_rank(to_matrix(module.weight.detach().double(), "channel"), rtol=1e-5)
        assert int(k) == pruner.ranks[name], name
    with pytest.raises(ValueError, match="different layers"):  # every rank refuses, none hangs
        trp.RankPruner(net, "channel", exclude=["layer3.2.conv2"] if rank else None)


def _tiny_ddp(rank, out):
    """The no-BatchNorm net, nd scheme, each rank on its half of the global batches; rank 0 saves."""
    torch.manual_seed(0)
    model = tiny_net()
    net = nn.parallel.DistributedDataParallel(model)
    pruner = trp.RankPruner(net, "nd", energy=0.8, nuclear=1e-3, nuclear_every="step")
    halves = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in global_batches()]
    for _ in sgd_trp_steps(net, model, pruner, halves):
        pass
    cut_one_rank(pruner)
    same_on_every_rank(list(model.parameters()), "tiny net")
    state = pruner.state_dict()  # the whole state on every rank, and it loads on every rank
    same_on_every_rank(list(state["subgradients"].values()), "subgradients of state_dict()")
    assert distributed.all_gather_objects(state["ranks"]) == [state["ranks"]] * 2
    pruner.load_state_dict(state)
    if rank == 0:
        torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, out)


def _pruner_worker(world, init_method, out):
    torch.set_num_threads(1)
    with distributed.process_group(world, "cpu", init_method):
        _check_resnet(world.rank)
        _tiny_ddp(world.rank, out)
        dist.barrier()  # rank 0 has saved
    if world.rank == 1:  # then a failure, which must stop the run with this worker's own message
        raise ValueError("no data for rank 1")


def test_two_processes_project_sharded_and_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    with pytest.raises(distributed.WorkerError, match="worker 1 of 2 failed: no data for rank 1"):
        distributed.spawn(_pruner_worker, 2, str(out))
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = tiny_net()
    pruner = trp.RankPruner(model, "nd", energy=0.8, nuclear=1e-3, nuclear_every="step")
    for _ in sgd_trp_steps(model, model, pruner, global_batches()):
        pass
    cut_one_rank(pruner)
    assert ddp["pruner"]["ranks"] == pruner.ranks
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k, G in pruner.state_dict()["subgradients"].items():
        torch.testing.assert_close(ddp["pruner"]["subgradients"][k], G, rtol=1e-5, atol=1e-6)


# --- trp train ----------------------------------------------------------------------------------------------

# `trp train --nproc N` takes at most one CPU worker per usable core
two_cores = pytest.mark.skipif(distributed.usable_cpus() < 2, reason="--nproc 2 needs 2 usable CPU cores")


@two_cores
def test_train_nproc_2_then_resume_with_nproc_1(tmp_path, capfd):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capfd, "train", *TINY, "--epochs", "1", "--nproc", "2", "--out", out,
                                "--no-report")
    assert code == 0, err
    assert stdout.count("epoch   1/1") == 1  # rank 0 alone logs
    saved = ckpt.load_checkpoint(out / train.CHECKPOINT)
    assert saved["config"]["nproc"] == 2 and len(saved["rng_ranks"]) == 2 and saved["epoch"] == 1
    # the warm-start bases of both ranks' groups, as one process would save them
    assert set(saved["pruner"]["warm_bases"]) == set(saved["pruner"]["ranks"])
    code, stdout, err = run_cli(capfd, "train", "--resume", "--out", out, "--epochs", "2", "--nproc", "1",
                                "--no-report", "--no-progress")
    assert code == 0, err
    saved = ckpt.load_checkpoint(out / train.CHECKPOINT)
    assert saved["config"]["nproc"] == 1 and saved["epoch"] == 2 and len(saved["history"]) == 2


@pytest.mark.slow
def test_train_under_torchrun(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trp", "train", *TINY, "--epochs", "1", "--no-report", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    # the failing rank's own output comes first, the launcher's summary last
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[:4000] + "\n...\n" + proc.stderr[-1500:]
    assert ckpt.load_checkpoint(out / train.CHECKPOINT)["config"]["nproc"] == 2


def _env(**extra):
    path = os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _workers(pid):
    """PIDs of the spawned worker processes of `pid` (not multiprocessing's resource tracker)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        out.append(int(child))
    return out


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux /proc children lists")
@two_cores
def test_killing_a_worker_ends_the_run_with_an_error(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trp", "train", *TINY, "--epochs", "500", "--nproc", "2", "--no-report",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(TRP_DIST_TIMEOUT="30"))
    try:
        deadline = time.monotonic() + 90
        while not (out / train.CHECKPOINT).exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert "trp: error: worker" in err and "died" in err
    assert not any(os.path.exists(f"/proc/{w}") and _alive(w) for w in workers)  # none left behind
    ckpt.load_checkpoint(out / train.CHECKPOINT)  # the last checkpoint is intact


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux /proc children lists")
@two_cores
def test_sigterm_to_the_parent_stops_the_workers_and_removes_the_rendezvous(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trp", "train", *TINY, "--epochs", "500", "--nproc", "2", "--no-report",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 90
        while not (out / train.CHECKPOINT).exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert len(workers) == 2 and [p.name for p in out.glob(".trp-rendezvous-*")]  # inside --out
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == f"trp: interrupted (the last good checkpoint ({out / train.CHECKPOINT}) is untouched; continue " \
                   "with --resume)", err
    assert not any(os.path.exists(f"/proc/{w}") and _alive(w) for w in workers)  # none left behind
    assert not list(out.glob(".trp-rendezvous-*")) and not list(out.glob(".*.tmp"))
    ckpt.load_checkpoint(out / train.CHECKPOINT)


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux /proc children lists")
@two_cores
def test_workers_of_a_killed_parent_stop_and_its_rendezvous_is_cleaned_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trp", "train", *TINY, "--epochs", "500", "--nproc", "2", "--no-report",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    workers = []
    try:
        deadline = time.monotonic() + 90
        while not (out / train.CHECKPOINT).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        workers = _workers(proc.pid)
        proc.kill()  # SIGKILL: the parent cannot stop its workers nor remove its rendezvous directory
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers):  # their watchdog sees the parent gone
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # never leave one behind, even when the test fails
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    left = [p.name for p in out.glob(".trp-rendezvous-*")]
    assert len(left) == 1 and distributed.clean_stale_rendezvous(out) == left
    ckpt.load_checkpoint(out / train.CHECKPOINT)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("amp, channels_last", [("bf16", True), ("fp16", False)])
def test_amp_and_channels_last_train_on_the_cpu(tmp_path, amp, channels_last):
    cfg = config.resolve_config(dict(data="digits", image_size=8, subset=48, batch_size=16, epochs=1,
                                    schedule=[1], out=str(tmp_path), seed=3, amp=amp, channels_last=channels_last))
    run = train.Run(cfg, log=lambda *_: None, progress=False).fit()
    assert run.history[0]["loss"] > 0 and all(r is not None for r in run.pruner.ranks.values())
    for name, module in run.pruner.layers:  # the projection keeps the weights' dtype and memory format
        assert module.weight.dtype == torch.float32
        assert module.weight.is_contiguous(memory_format=torch.channels_last) == channels_last, name
    if amp == "fp16":
        assert "scaler" in ckpt.load_checkpoint(tmp_path / train.CHECKPOINT)


def test_compile_trains_the_compiled_model_with_the_pruner(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def eager_compile(model, **kw):  # inductor would take minutes on this CPU; the wiring is the same
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = config.resolve_config(dict(data="digits", image_size=8, subset=32, batch_size=16, epochs=1,
                                    schedule=[1], out=str(tmp_path), seed=3, compile=True))
    run = train.Run(cfg, log=lambda *_: None, progress=False).fit()
    assert compiled == [run.model] and run.net is not run.model
    assert run.pruner.steps == 2 and all(r is not None for r in run.pruner.ranks.values())
    assert "_orig_mod" not in "".join(ckpt.load_checkpoint(tmp_path / train.CHECKPOINT)["model"])


def test_bad_distributed_options_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 8)  # --nproc 3 fits; its batch does not
    for args, expected in ((["--nproc", "0"], "--nproc"), (["--amp", "fp8"], "--amp"),
                           (["--nproc", "3", "--batch-size", "16"], "multiple of --nproc 3")):
        code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "x", *args)
        assert code == 2 and expected in err, err
    monkeypatch.setenv("TRP_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TRP_DIST_TIMEOUT"):
        distributed.timeout()
