"""RankPruner on a model sharded with FSDP2 (fully_shard: DTensor parameters) on 2 gloo processes: every rank
gathers the groups it projects, and each rank's shards end as one process's weights after the same steps
(projection, nuclear subgradients in the sharded gradients, SGD), with an uneven shard and a shard of dimension 1;
the ranks agree on the layer ranks; a state saved and loaded into a new pruner on the sharded model continues
identically; a NaN in one rank's shard is refused on every rank before any weight changes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from test_distributed import cut_one_rank, global_batches, same_on_every_rank
from trp.prune import distributed

fsdp_api = pytest.importorskip("torch.distributed.fsdp", reason="torch.distributed is not available")
if not hasattr(fsdp_api, "fully_shard"):
    pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)",
                allow_module_level=True)
Shard = pytest.importorskip("torch.distributed.tensor").Shard

STEPS, RESUMED = 3, 2  # steps before the state is saved, and after it is loaded into a new pruner
# (scheme, layers): Linear-like layers have the channel scheme only
CASES = (("channel", ["2.0", "2.2", "5.0", "5.2"]), ("nd", ["2.0", "2.2"]))


def conv_net():
    """No BatchNorm; blocks that fully_shard wraps (a sharded layer itself would carry FSDP's forward hooks,
    which selection refuses); "5.0" has 15 rows: uneven shards over 2 ranks."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                       nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Sequential(nn.Linear(16, 15), nn.ReLU(), nn.Linear(15, 10)))


def whole(tensors):
    """{name: whole tensor} of plain tensors or DTensors (gathered: a collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in tensors.items()}


def train(model, scheme, layers, sharded):
    """STEPS steps, the pruner's state into a new pruner, RESUMED more; the whole weights after each projection
    and at the end, the whole gradients after each regularize(), and the ranks."""
    def make():
        return trp.RankPruner(model, scheme, energy=0.8, nuclear=1e-3, nuclear_every="step", layers=layers)

    pruner = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    record = []
    for step, (x, y) in enumerate(global_batches(STEPS + RESUMED, n=8)):  # the same data on every rank
        if step == STEPS:
            state = pruner.state_dict()
            pruner = make()
            pruner.load_state_dict(state)
        pruner.step()
        weights = whole(dict(model.named_parameters()))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        grads = whole({n: m.weight.grad for n, m in pruner.layers})
        opt.step()
        record.append({"weights": weights, "grads": grads, "ranks": pruner.ranks})
        if sharded:
            assert distributed.all_gather_objects(pruner.ranks) == [pruner.ranks] * 2
            same_on_every_rank(list(pruner.state_dict()["subgradients"].values()), "subgradients")
    record.append({"weights": whole(dict(model.named_parameters()))})
    cut_one_rank(pruner)  # the budget's cut on sharded weights: gathered, truncated by the owner, written back
    record.append({"weights": whole(dict(model.named_parameters())), "ranks": pruner.ranks})
    return record, pruner


def sharded_net():
    """conv_net() under fully_shard: the convs of block 2 sharded along dimension 1, block 5 and the rest along 0."""
    model = conv_net()
    fsdp_api.fully_shard(model[2], shard_placement_fn=lambda p: Shard(1) if p.dim() == 4 else None)
    fsdp_api.fully_shard(model[5])
    fsdp_api.fully_shard(model)
    return model


def _sharded_run(rank, scheme, layers):
    torch.manual_seed(0)
    model = sharded_net()
    assert model[2][2].weight.placements == (Shard(1),) and model[5][0].weight.to_local().shape[0] == 8 - rank
    record, pruner = train(model, scheme, layers, sharded=True)
    assert pruner.engine.sharded and set(pruner._sharding.owners) == {0, 1}  # both ranks project
    # a NaN in rank 1's shard: every rank refuses before writing anything
    with torch.no_grad():
        if rank == 1:
            model[2][2].weight.to_local()[0, 0, 0, 0] = float("nan")
    before = whole(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"non-finite .* layer\(s\) 2\.2;"):
        pruner.step()
    for k, v in whole(dict(model.named_parameters())).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    return record


def _fsdp_worker(world, init_method, out):
    torch.set_num_threads(1)
    with distributed.process_group(world, "cpu", init_method):
        try:  # this torch's FSDP2 on the CPU with gloo at all: a forward and backward pass
            sharded_net()(torch.randn(2, 3, 8, 8)).sum().backward()
        except (RuntimeError, NotImplementedError) as exc:
            if world.rank == 0:
                torch.save({"skip": f"FSDP2 does not run on the CPU with gloo here: {exc}"}, out)
            return
        records = {scheme: _sharded_run(world.rank, scheme, layers) for scheme, layers in CASES}
        if world.rank == 0:
            torch.save(records, out)


def test_fsdp2_sharded_pruning_matches_one_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    distributed.spawn(_fsdp_worker, 2, str(out))
    sharded = torch.load(out)
    if "skip" in sharded:
        pytest.skip(sharded["skip"])
    for scheme, layers in CASES:
        torch.manual_seed(0)
        expected, _ = train(conv_net(), scheme, layers, sharded=False)
        assert len(sharded[scheme]) == len(expected) == STEPS + RESUMED + 2
        for step, (got, want) in enumerate(zip(sharded[scheme], expected)):
            assert got.get("ranks") == want.get("ranks"), (scheme, step)
            for what in ("weights", "grads"):
                for k, v in want.get(what, {}).items():
                    torch.testing.assert_close(got[what][k], v, rtol=1e-5, atol=1e-6,
                                               msg=f"{scheme} step {step} {what} {k}")
