import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.models.projector import (
    ProjectorConfig,
    build_projector_from_config,
    count_parameters,
    speechmapper_paper,
    speechmapper_small,
    speechmapper_tiny,
)


def test_output_length_matches_forward_for_many_lengths():
    model = speechmapper_tiny().eval()
    for n in range(4, 90):
        out, out_len = model(torch.randn(1, n, 16))
        assert out.shape[1] == model.output_length(n) == int(out_len[0]), n
        assert model.output_length(torch.tensor([n])).item() == model.output_length(n)


def test_output_length_is_a_quarter():
    model = speechmapper_tiny()
    assert [model.output_length(n) for n in (4, 7, 8, 100, 101)] == [1, 1, 2, 25, 25]


@pytest.mark.parametrize("norm_first", [True, False])
def test_batched_equals_one_by_one(norm_first):
    torch.manual_seed(0)
    model = speechmapper_tiny(norm_first=norm_first).eval()
    lengths = [53, 9, 31, 40]
    xs = [torch.randn(n, 16) for n in lengths]
    batch = torch.zeros(len(xs), max(lengths), 16)
    for i, x in enumerate(xs):
        batch[i, : len(x)] = x
    out, out_len = model(batch, torch.tensor(lengths))
    for i, x in enumerate(xs):
        single, n = model(x[None])
        assert int(n) == int(out_len[i])
        assert_close_to_scale(out[i, : int(n)], single[0], FP32_SHALLOW)  # batch shape: other kernels
        assert out[i, int(n) :].abs().max().item() == 0 if int(n) < out.shape[1] else True


def test_padding_content_does_not_leak():
    torch.manual_seed(1)
    model = speechmapper_tiny().eval()
    x = torch.randn(2, 40, 16)
    a, _ = model(x, torch.tensor([40, 20]))
    x[1, 20:] = 1e3  # garbage in the padded region
    b, _ = model(x, torch.tensor([40, 20]))
    assert torch.equal(a, b)  # same shapes and kernels: a leak of 1e3 could only show as a difference


def test_paper_preset_parameter_count_near_277M():
    with torch.device("meta"):
        model = speechmapper_paper()
    n = count_parameters(model)
    assert 270e6 < n < 285e6, n  # paper: 277M; FFN 1.5x width gives 279.1M
    assert model.output_dim == 4096 and model.input_dim == 1024


def test_small_preset_dims():
    model = speechmapper_small()
    out, _ = model(torch.randn(1, 40, 512))
    assert out.shape == (1, 10, 576)


def test_config_round_trip_rebuilds_same_model():
    model = speechmapper_tiny()
    cfg = model.config.to_dict()
    rebuilt = build_projector_from_config(cfg)
    rebuilt.load_state_dict(model.state_dict())
    assert ProjectorConfig.from_dict(cfg) == model.config
    x = torch.randn(1, 30, 16)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x)[0], rebuilt(x)[0])  # same weights, same kernels: exact


def test_errors_are_clear():
    model = speechmapper_tiny()
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"expected features \[B, T, 16\]"):
        model(torch.randn(1, 30, 8))
