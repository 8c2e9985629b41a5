"""The three CIFAR-10 networks: shapes, parameter counts of the reference study, a training step."""

from __future__ import annotations

import pytest
import torch

from torchode_adjoint import ODEBlock
from torchode_adjoint.measure import state_dict_bytes
from torchode_adjoint.models.cifar10 import build_model, ode_blocks, parse_model_spec

# The thesis preset puts a plain BatchNorm in the dynamics on purpose (it is the reference).
pytestmark = pytest.mark.filterwarnings("ignore::torchode_adjoint.TimeSharedStatisticsWarning")

# Parameter counts and "memory" (state dict bytes) from the reference study's table.
THESIS = {
    "resnet1": (72_746, 292_688),
    "resnet2": (None, 478_944),
    "resnet3": (None, 665_200),
    "odenet@0.5": (73_610, 296_144),
    "hybrid1@0.1": (73_322, 294_992),
    "hybrid2@0.5": (None, 332_504),
    "hybrid3@0.5": (None, 370_016),
}


@pytest.mark.parametrize("name", sorted(THESIS))
def test_thesis_preset_matches_the_reference_parameter_counts_and_bytes(name: str) -> None:
    model = build_model(parse_model_spec(name), preset="thesis")
    params, nbytes = THESIS[name]
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    assert state_dict_bytes(model) == nbytes


@pytest.mark.parametrize("name", ["resnet1", "odenet@0.5", "hybrid1@0.5"])
@pytest.mark.parametrize("preset", ["thesis", "standard"])
def test_output_shape_and_one_training_step_changes_every_parameter(name, preset) -> None:
    torch.manual_seed(0)
    model = build_model(parse_model_spec(name), preset=preset)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    assert model(x).shape == (8, 10)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert sum(changed) >= len(changed) - 4  # conv biases before a BatchNorm get zero gradient


def test_standard_preset_has_separate_convs() -> None:
    thesis = build_model(parse_model_spec("odenet@0.5"), preset="thesis")
    standard = build_model(parse_model_spec("odenet@0.5"), preset="standard")
    assert sum(p.numel() for p in standard.parameters()) > sum(
        p.numel() for p in thesis.parameters()
    )


def test_ode_stages_carry_solver_step_and_gradient_mode() -> None:
    model = build_model(parse_model_spec("odenet@0.25"), solver="rk4", adjoint=False)
    blocks = ode_blocks(model)
    assert len(blocks) == 2 and all(isinstance(b, ODEBlock) for b in blocks)
    assert all(
        b.step == 0.25 and b.solver.name == "rk4" and b.adjoint.name == "backprop" for b in blocks
    )
    assert len(ode_blocks(build_model(parse_model_spec("hybrid2@0.5")))) == 1
    assert ode_blocks(build_model(parse_model_spec("resnet3"))) == []
    assert all(b.config.compile is None for b in blocks)


def test_compile_reaches_every_ode_block() -> None:
    model = build_model(parse_model_spec("odenet@0.5"), compile=True)
    assert [b.config.compile is not None for b in ode_blocks(model)] == [True, True]


@pytest.mark.parametrize("text", ["odenet", "resnet1@0.5", "odenet2@0.5", "vgg16", "hybrid0@0.5"])
def test_bad_model_specs_are_refused_with_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="spec"):
        parse_model_spec(text)


def test_spec_names_round_trip() -> None:
    for text in ["resnet1", "resnet3", "odenet@0.5", "hybrid2@0.1"]:
        assert parse_model_spec(text).name == text


@pytest.mark.parametrize("name", ["odenet@0.5", "hybrid1@0.1"])
def test_temporal_norm_keeps_the_thesis_parameter_counts_and_uses_per_time_statistics(
    name: str,
) -> None:
    from torchode_adjoint import TemporalBatchNorm2d

    model = build_model(parse_model_spec(name), preset="thesis", norm="temporal")
    assert sum(p.numel() for p in model.parameters()) == THESIS[name][0]
    norms = [m for b in ode_blocks(model) for m in b.dynamics.modules()]
    assert any(isinstance(m, TemporalBatchNorm2d) for m in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in norms)
    model(torch.randn(4, 3, 32, 32))
    block = ode_blocks(model)[-1]
    recorded = block.dynamics.norm1.recorded_times()
    assert recorded == pytest.approx([k * block.step for k in range(round(1 / block.step))])


def test_the_thesis_temporal_dynamics_keep_statistics_per_application_and_one_affine() -> None:
    model = build_model(parse_model_spec("odenet@0.5"), preset="thesis", norm="temporal")
    f = ode_blocks(model)[0].dynamics
    assert f.norm1 is not f.norm2
    assert f.norm1.weight is f.norm2.weight and f.norm1.bias is f.norm2.bias
    assert f.norm1.running_mean.data_ptr() != f.norm2.running_mean.data_ptr()
    model(torch.randn(8, 3, 32, 32))
    # The two applications see different distributions, so their statistics differ.
    assert not torch.allclose(f.norm1.running_mean, f.norm2.running_mean)
