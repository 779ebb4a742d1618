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
