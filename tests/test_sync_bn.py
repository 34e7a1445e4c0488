"""CrossReplicaBatchNorm against nn.BatchNorm: alone it is nn.BatchNorm; over 2 gloo processes, each
feeding half of the batch, it is ONE nn.BatchNorm over the whole batch (outputs, input and parameter
gradients, running stats); compiled, it has no graph break or recompile; train.py runs with it.

Gradient convention: each rank backpropagates sum(y_rank * g_rank) for its rows of one global
upstream gradient g. The global loss is the sum over ranks, so the weight/bias gradients summed over
ranks must equal the single-process ones (DDP averages them instead: the gradient of the mean of the
per-rank losses); input gradients need no reduction, each rank owns its rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn as nn
import torchvision.models as tvm

from models.sync_bn import CrossReplicaBatchNorm, convert_cross_replica_bn
from runtime.distributed import close_world, init_world, launch

WORLD, STEPS = 2, 2
# Per case: the BN, the global input shape, channels_last input, the input dtype (bf16 runs the
# module in fp32 under bf16 autocast).
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool, torch.dtype]] = {
    "1d": (lambda: nn.BatchNorm1d(5), (8, 5), False, torch.float64),
    "1d_with_length": (lambda: nn.BatchNorm1d(5), (6, 5, 3), False, torch.float64),
    "2d_channels_last": (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5), True, torch.float64),
    "2d_cumulative_momentum": (lambda: nn.BatchNorm2d(3, momentum=None), (4, 3, 2, 2), False, torch.float64),
    "2d_bf16_autocast": (lambda: nn.BatchNorm2d(3), (4, 3, 4, 4), True, torch.bfloat16),
}
# float64 inputs: only the summation order differs (E[x^2] - E[x]^2 over ranks vs one Welford pass).
FP64 = {"rtol": 1e-9, "atol": 1e-10}


def make_case(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A plain BN with non-trivial affine parameters and running stats, and STEPS (input, upstream
    gradient) global batches whose mean is far from 0 (the E[x^2] - E[x]^2 formula's weak spot)."""
    make_bn, shape, channels_last, dtype = CASES[name]
    generator = torch.Generator().manual_seed(0)
    bn = make_bn().to(torch.float32 if dtype == torch.bfloat16 else dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=generator)
        bn.bias.normal_(generator=generator)
        bn.running_mean.normal_(generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
    batches = []
    for _ in range(STEPS):
        x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(dtype)
        g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        batches.append((x, g))
    return bn, batches


def run_case(bn: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rows: slice) -> dict[str, torch.Tensor]:
    """STEPS training forward/backward passes on `rows` of each batch, then an eval forward."""
    record = {}
    for step, (x, g) in enumerate(batches):
        x = x[rows].detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
            y = bn(x)
        (y * g[rows]).sum().backward()
        assert y.dtype == x.dtype and y.stride() == x.stride()  # channels_last stays channels_last
        record |= {f"out{step}": y.detach(), f"input_grad{step}": x.grad,
                   f"weight_grad{step}": bn.weight.grad.clone(), f"bias_grad{step}": bn.bias.grad.clone()}
        bn.zero_grad()
    bn.eval()
    with torch.no_grad():
        record["eval_out"] = bn(batches[0][0][rows])
    bn.train()
    return record | {name: buffer.clone() for name, buffer in bn.named_buffers()}


@pytest.mark.parametrize("name", CASES)
def test_alone_it_is_nn_batchnorm(name):
    reference, batches = make_case(name)
    converted = convert_cross_replica_bn(copy.deepcopy(reference))
    assert isinstance(converted, CrossReplicaBatchNorm)
    expected, got = run_case(reference, batches, slice(None)), run_case(converted, batches, slice(None))
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    net = tvm.resnet18()
    net.fc = nn.Sequential(nn.Linear(512, 8), nn.BatchNorm1d(8))
    net.layer1.eval()
    before = net.state_dict(keep_vars=True)
    converted = convert_cross_replica_bn(net)
    assert converted is net
    after = converted.state_dict(keep_vars=True)
    # The very same tensors under the same keys: an optimizer built before still holds them.
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 21 and all(type(m) is CrossReplicaBatchNorm for m in bns)
    assert not converted.layer1[0].bn1.training and converted.bn1.training
    assert convert_cross_replica_bn(converted).bn1 is converted.bn1  # converting twice changes nothing
    plain = tvm.resnet18()
    plain.fc = nn.Sequential(nn.Linear(512, 8), nn.BatchNorm1d(8))
    plain.load_state_dict(converted.state_dict())  # strict: a checkpoint loads into torchvision


def conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return convert_cross_replica_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.BatchNorm1d(6))).double()


def compiled_vs_eager() -> dict[str, torch.Tensor]:
    """STEPS compiled forward/backward passes and the same in eager, on channels_last float64 inputs
    (fp32 would differ by rounding amplified by BN over 8 rows, hiding what is compared)."""
    eager, compiled_model = conv_bn_model(), conv_bn_model()
    # Graph breaks, recompiles and the traced backward are decided before the backend: aot_eager
    # checks them without inductor's minute of C++ compiles on 2 cores.
    compiled = torch.compile(compiled_model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(dist.get_rank())
    record = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(STEPS):
            x = torch.randn(4, 3, 6, 6, generator=generator, dtype=torch.float64).to(memory_format=torch.channels_last)
            for tag, model in (("eager", eager), ("compiled", compiled)):
                out = model(x)
                out.square().sum().backward()
                record[f"{tag}_out{step}"] = out.detach()
    for tag, model in (("eager", eager), ("compiled", compiled_model)):
        record |= {f"{tag}_{k}": v.detach().clone() for k, v in model.state_dict().items()}
        record |= {f"{tag}_{k}.grad": p.grad for k, p in model.named_parameters()}
    record["graph_breaks"] = torch.tensor(sum(torch._dynamo.utils.counters["graph_break"].values()))
    return record


def rank_rows(batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> slice:
    share = len(batches[0][0]) // WORLD
    return slice(rank * share, (rank + 1) * share)


def parity_rank(out: str) -> int:
    world = init_world(use_cuda=False)
    try:
        results = {}
        for name in CASES:
            bn, batches = make_case(name)
            results[name] = run_case(convert_cross_replica_bn(bn), batches, rank_rows(batches, world.rank))
        results["compiled"] = compiled_vs_eager()
    finally:
        close_world(world)
    torch.save(results, Path(out) / f"rank{world.rank}.pt")
    return 0


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("sync_bn")
    assert launch(parity_rank, str(out), world_size=WORLD) == 0
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
def test_two_gloo_ranks_are_one_batchnorm_over_the_whole_batch(two_ranks, name):
    reference, batches = make_case(name)
    bf16 = batches[0][0].dtype == torch.bfloat16
    if bf16:  # the reference: fp32 BN on the same (bf16-representable) values, no autocast
        batches = [(x.float(), g.float()) for x, g in batches]
    expected = run_case(reference, batches, slice(None))
    for key, tensor in expected.items():
        if key.startswith(("out", "input_grad", "eval_out")):  # per row: each rank's rows
            got = torch.cat([rank[name][key] for rank in two_ranks])
            # bf16 outputs and input gradients: bf16 rounding of the result.
            tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else FP64
        elif key.startswith(("weight_grad", "bias_grad")):
            got = sum(rank[name][key] for rank in two_ranks)
            tolerance = {"rtol": 1e-5, "atol": 1e-5} if bf16 else FP64
        else:  # buffers: the same on every rank
            assert torch.equal(two_ranks[0][name][key], two_ranks[1][name][key]), key
            got = two_ranks[0][name][key]
            # fp32 sums of bf16 values match the fp32 reference to fp32 rounding; bf16 sums would not.
            tolerance = {"rtol": 1e-6, "atol": 1e-6} if bf16 else FP64
        torch.testing.assert_close(got.to(tensor.dtype), tensor, **tolerance, msg=f"{name} {key}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_cross_replica_bn_has_no_graph_break_and_matches_eager(two_ranks):
    for rank in two_ranks:
        record = rank["compiled"]
        assert record["graph_breaks"] == 0
        for key in [k.removeprefix("eager_") for k in record if k.startswith("eager_")]:
            torch.testing.assert_close(record[f"compiled_{key}"], record[f"eager_{key}"], **FP64, msg=key)
    # Cross-replica statistics: both ranks end with the same running stats (their inputs differ).
    for key in ("eager_1.running_mean", "eager_6.running_var", "compiled_1.running_var"):
        assert torch.equal(two_ranks[0]["compiled"][key], two_ranks[1]["compiled"][key]), key
    assert not torch.equal(two_ranks[0]["compiled"]["eager_out0"], two_ranks[1]["compiled"]["eager_out0"])

