"""retrieval.training: records, loss, schedule, recall, augmentation, padding trim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.training import (
    MAX_LOGIT_SCALE,
    DataFormatError,
    clamp_logit_scale_,
    contrastive_loss,
    merge_config,
    random_shift,
    read_records,
    recall_at_k,
    trim_padding,
    warmup_cosine,
)


def test_read_records_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text('file,caption\na.png,红色的圆形\nb.png,"a, b"\n', encoding="utf-8")
    rows = read_records(tmp_path / "c.csv")
    assert [r["caption"] for r in rows] == ["红色的圆形", "a, b"]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "x"}) + "\n\n", encoding="utf-8"
    )
    assert read_records(tmp_path / "c.jsonl") == [{"file": "a.png", "caption": "x"}]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.csv", "file,caption\na.png,\n", "record 1 lacks caption"),
        ("c.csv", "file,text\na.png,x\n", "lacks caption"),
        ("c.jsonl", "{not json\n", "invalid JSON"),
        ("c.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("c.txt", "a.png x\n", "unsupported captions format"),
        ("c.csv", "file,caption\n", "no records"),
    ],
)
def test_read_records_errors_name_the_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_records(tmp_path / name)
    with pytest.raises(DataFormatError, match="not found"):
        read_records(tmp_path / "missing.csv")


def test_contrastive_loss_is_symmetric_infonce() -> None:
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    t = torch.arange(6)
    expected = (
        torch.nn.functional.cross_entropy(logits, t) + torch.nn.functional.cross_entropy(logits.T, t)
    ) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)
    assert contrastive_loss(img, img * 3, scale) < contrastive_loss(
        img, txt, scale
    )  # aligned pairs: lower loss


def test_logit_scale_clamped_like_clip() -> None:
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert p.item() == pytest.approx(MAX_LOGIT_SCALE) and math.exp(p.item()) == pytest.approx(100.0)


def test_warmup_then_cosine() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[14] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_recall_at_k() -> None:
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.1, 0.2, 0.0]])
    r = recall_at_k(sims, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(sims, np.eye(2, dtype=bool))


def test_random_shift_translates_within_bounds() -> None:
    x = torch.zeros(3, 3, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    gen = torch.Generator().manual_seed(0)
    y = random_shift(x, 2, gen)
    assert y.shape == x.shape and torch.all(y.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3)))
    assert torch.equal(random_shift(x, 0, gen), x)


def test_trim_padding_keeps_every_real_token() -> None:
    ids = torch.tensor([[1, 5, 2, 0, 0, 0], [1, 7, 8, 9, 2, 0]])
    assert torch.equal(trim_padding(ids), ids[:, :5])


def test_merge_config_is_recursive() -> None:
    base = {"a": 1, "sub": {"x": 1, "y": 2}}
    assert merge_config(base, {"sub": {"y": 3}}) == {"a": 1, "sub": {"x": 1, "y": 3}}
    assert base["sub"]["y"] == 2


def test_batch_sampler_epochs_cover_every_sample_once() -> None:
    from retrieval.training import BatchSampler

    s = BatchSampler(10, 5, seed=0)
    first = np.concatenate([s.next(), s.next()])
    assert sorted(first.tolist()) == list(range(10))
    again = BatchSampler(10, 5, seed=0)
    assert np.array_equal(np.concatenate([again.next(), again.next()]), first)  # deterministic


def test_batch_sampler_hard_negative_groups() -> None:
    from retrieval.training import BatchSampler

    groups = ["red"] * 20 + ["blue"] * 20 + ["green"] * 20
    s = BatchSampler(60, 8, seed=1, groups=groups, groups_per_batch=2)
    for _ in range(20):
        batch = s.next()
        assert len(batch) == 8 and len(set(batch.tolist())) == 8
        assert len({groups[i] for i in batch}) == 2
    with pytest.raises(ValueError, match="group keys"):
        BatchSampler(3, 2, seed=0, groups=["a"])


# --- initialisation helpers for fresh tiny models ----------------------------------------------------
def _fresh_demo_model(seed: int = 0):  # noqa: ANN202
    from retrieval.internvl import InternVLConfig, InternVLModel
    from retrieval.training import DEMO_PRESET

    torch.manual_seed(seed)
    return InternVLModel(InternVLConfig.from_dict(merge_config(InternVLConfig().to_dict(), DEMO_PRESET)))


def _first_layer_attention(model) -> torch.Tensor:  # noqa: ANN001
    """Head-averaged attention probabilities (N, N) of block 1 on a blank (all-mean) image."""
    emb = model.vision_model.embeddings
    with torch.no_grad():
        x = emb(torch.zeros(1, 3, emb.image_size, emb.image_size))
        attn = model.vision_model.encoder.layers[0].attn
        h = model.vision_model.encoder.layers[0].norm1(x)
        b, n, c = h.shape
        q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
        q = attn.q_norm(q.flatten(-2)).view(b, n, attn.num_heads, attn.head_dim)
        k = attn.k_norm(k.flatten(-2)).view(b, n, attn.num_heads, attn.head_dim)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
        return logits.softmax(-1).mean(1)[0]


def test_sincos_position_embedding_is_fixed_2d_table() -> None:
    from retrieval.training import sincos_position_embedding_

    model = _fresh_demo_model()
    sincos_position_embedding_(model)
    table = model.vision_model.embeddings.position_embedding[0]
    assert torch.all(table[0] == 0)  # class token
    patches = table[1:]
    grid = int(math.isqrt(len(patches)))
    sims = patches @ patches.t()
    # each position is most similar to itself, and nearer positions more similar than far ones
    assert torch.equal(sims.argmax(1), torch.arange(len(patches)))
    assert sims[0, 1] > sims[0, grid - 1] and sims[0, grid] > sims[0, grid * (grid - 1)]


def test_mimetic_init_makes_first_attention_local() -> None:
    from retrieval.training import mimetic_attention_init_, sincos_position_embedding_

    plain, mimetic = _fresh_demo_model(), _fresh_demo_model()
    for m in (plain, mimetic):
        sincos_position_embedding_(m)
    mimetic_attention_init_(mimetic, seed=3)
    grid = int(math.isqrt(plain.vision_model.embeddings.position_embedding.shape[1] - 1))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    dist = torch.cdist(pos, pos)  # patch-to-patch distance in grid cells

    def mean_attended_distance(model) -> float:  # noqa: ANN001
        att = _first_layer_attention(model)[1:, 1:]
        return float((att / att.sum(1, keepdim=True) * dist).sum(1).mean())

    uniform = float(dist.mean())
    assert mean_attended_distance(plain) == pytest.approx(uniform, rel=0.02)  # random init: uniform
    assert mean_attended_distance(mimetic) < 0.92 * uniform  # mimetic: patches attend to their neighbours
    # W_v^T W_o^T = a Z - b I: the value/output path starts as a negative identity plus noise
    layer = mimetic.vision_model.encoder.layers[0].attn
    dim = layer.embed_dim
    vo = layer.qkv.weight[2 * dim :].t() @ layer.proj.weight.t()
    assert vo.diagonal().mean().item() == pytest.approx(-0.4, abs=0.1)
    again = _fresh_demo_model()
    mimetic_attention_init_(again, seed=3)
    weights = [m.vision_model.encoder.layers[2].attn.qkv.weight for m in (again, mimetic)]
    assert torch.equal(*weights)  # deterministic per seed


def test_sharpen_attention_pooling_sets_qk_scale() -> None:
    from retrieval.training import sharpen_attention_pooling_

    model = _fresh_demo_model()
    sharpen_attention_pooling_(model, 0.2)
    for block in (model.clip_projector, model.clip_projector2):
        for linear in (block.cross_attn.q, block.cross_attn.k):
            assert linear.weight.std().item() == pytest.approx(0.2, rel=0.05)
    assert model.clip_projector.cross_attn.v.weight.std().item() < 0.15  # values untouched
    with pytest.raises(ValueError, match="positive"):
        sharpen_attention_pooling_(model, 0.0)
