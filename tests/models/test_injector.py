import pytest
import torch

from speechmapper_tune.models.injector import inject_speech, speech_span_mask, trailing_pad_lengths


def test_vectors_land_on_each_span_and_nowhere_else():
    tok = torch.zeros(2, 8, 3)
    speech = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3) + 1
    starts, lengths = torch.tensor([1, 3]), torch.tensor([4, 2])
    out = inject_speech(tok, speech, starts, lengths, speech_span_mask(starts, lengths, 8))
    assert torch.equal(out[0, 1:5], speech[0])  # a copy: exact
    assert torch.equal(out[1, 3:5], speech[1, :2])
    assert out[0, [0, 5, 6, 7]].abs().sum() == 0 and out[1, [0, 1, 2, 5, 6, 7]].abs().sum() == 0


def test_gradients_reach_the_speech_only_on_the_span():
    speech = torch.randn(1, 5, 4, requires_grad=True)
    out = inject_speech(torch.zeros(1, 9, 4), speech, torch.tensor([2]), torch.tensor([3]))
    out.sum().backward()
    assert speech.grad[0, :3].eq(1).all() and speech.grad[0, 3:].eq(0).all()


def test_dtype_follows_the_llm():
    out = inject_speech(
        torch.zeros(1, 4, 2, dtype=torch.bfloat16), torch.ones(1, 2, 2), torch.tensor([1]), torch.tensor([2])
    )
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "starts, lengths, mask_len, message",
    [
        ([6], [3], 3, "does not fit"),
        ([0], [6], 6, "the speech has 5"),
        ([1], [3], 2, "2 placeholder positions but a speech span of 3"),
    ],
)
def test_count_mismatches_raise(starts, lengths, mask_len, message):
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, starts[0] : starts[0] + mask_len] = True
    with pytest.raises(ValueError, match=message):
        inject_speech(torch.zeros(1, 8, 2), torch.zeros(1, 5, 2), torch.tensor(starts), torch.tensor(lengths), mask)


def test_trailing_pad_lengths():
    emb = torch.eye(4)  # pad id 3
    vecs = torch.stack([emb[0], emb[1], emb[3], emb[2], emb[3], emb[3]])[None].repeat(2, 1, 1)
    vecs[1, :] = emb[3]
    got = trailing_pad_lengths(vecs, torch.tensor([6, 6]), emb, pad_id=3)
    assert got.tolist() == [4, 1]  # a pad inside the content stays; at least one vector is kept
