import json

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.checkpoint.projector_io import load_projector, save_projector
from speechmapper_tune.models.projector import build_projector_from_config, speechmapper_tiny
from speechmapper_tune.models.query_projector import QueryProjector, query_projector


def tiny(**kw):
    kw = {"model_dim": 32, "num_layers": 2, "num_heads": 2, "window_frames": 8, "queries_per_window": 3, **kw}
    return query_projector(16, 24, **kw)


def test_output_length_matches_forward_for_many_lengths():
    model = tiny().eval()
    for n in range(1, 40):
        out, out_len = model(torch.randn(1, n, 16))
        assert out.shape == (1, model.output_length(n), 24) and int(out_len[0]) == model.output_length(n), n
        assert model.output_length(torch.tensor([n])).item() == model.output_length(n)
    assert [model.output_length(n) for n in (1, 8, 9, 16, 17)] == [3, 3, 6, 6, 9]  # ceil(n / 8) windows x 3
    assert model.output_dim == 24 and model.input_dim == 16


def test_batched_equals_one_by_one():
    torch.manual_seed(0)
    model = tiny().eval()
    lengths = [53, 9, 31, 40, 1]
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
    assert torch.isfinite(out).all()  # windows of padding only give zeros, not NaN


def test_padding_content_does_not_leak():
    torch.manual_seed(1)
    model = tiny().eval()
    x = torch.randn(2, 40, 16)
    a, _ = model(x, torch.tensor([40, 21]))  # 21: the third window is part frames, part padding
    x[1, 21:] = 1e3
    b, _ = model(x, torch.tensor([40, 21]))
    assert torch.equal(a, b)


def test_gradients_are_finite_with_padding_windows():
    model = tiny().train()
    out, _ = model(torch.randn(2, 40, 16), torch.tensor([40, 5]))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_config_round_trip_through_save_and_load(tmp_path):
    torch.manual_seed(2)
    model = tiny().eval()
    save_projector(tmp_path, model, {"stage": 1})
    saved = json.loads((tmp_path / "projector_config.json").read_text())["projector"]
    assert saved["kind"] == "query"
    loaded, _ = load_projector(tmp_path)
    assert isinstance(loaded, QueryProjector) and loaded.config == model.config
    x = torch.randn(2, 30, 16)
    assert torch.equal(loaded.eval()(x, torch.tensor([30, 12]))[0], model(x, torch.tensor([30, 12]))[0])
    assert isinstance(build_projector_from_config(model.config), QueryProjector)


def test_conv_configs_without_kind_still_build_conv_projectors(tmp_path):
    conv = speechmapper_tiny().eval()
    assert "kind" not in conv.config.to_dict()  # conv checkpoints are written exactly as before
    save_projector(tmp_path, conv, {"stage": 1})
    loaded, _ = load_projector(tmp_path)
    assert type(loaded) is type(conv)
    x = torch.randn(1, 20, 16)
    assert torch.equal(loaded.eval()(x)[0], conv(x)[0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="window_frames"):
        tiny(window_frames=0)


def test_fixed_number_of_queries_whatever_the_length():
    """window_frames=None (SparQLe): one window over the utterance, always queries_per_window vectors."""
    torch.manual_seed(3)
    model = tiny(window_frames=None, queries_per_window=5).eval()
    lengths = [37, 3, 20]
    xs = [torch.randn(n, 16) for n in lengths]
    batch = torch.full((3, 37, 16), 1e3)  # loud padding: masked out of cross-attention
    for i, x in enumerate(xs):
        batch[i, : len(x)] = x
    out, out_len = model(batch, torch.tensor(lengths))
    assert out.shape == (3, 5, 24) and out_len.tolist() == [5, 5, 5] and model.output_length(1000) == 5
    for i, x in enumerate(xs):
        single, n = model(x[None])
        assert int(n) == 5
        assert_close_to_scale(out[i], single[0], FP32_SHALLOW)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not hasattr(model, "frame_pos")  # no learned positions: they would fix the longest length
