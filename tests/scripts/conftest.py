"""Make ``scripts/`` importable; shared tiny dataset and tiny trained model for the script tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import finetune_contrastive as ft  # noqa: E402
import generate_shapes as gs  # noqa: E402

TINY = {
    "vision_config": {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    },
    "qllama_config": {
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
    },
    "clip_embed_dim": 16,
    "attn_pool_num_heads": 2,
    "num_query_token": 2,
    "hidden_size": 16,
}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    gs.main(["--out", str(out), "--n", "16", "--seed", "11"])
    return out


@pytest.fixture(scope="session")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("run")
    (root / "tiny.json").write_text(json.dumps(TINY))
    options = "--steps 12 --batch-size 16 --lr 2e-3 --warmup 2 --seed 3 --save-dtype float32 --threads 1"
    argv = [*options.split(), "--data", str(shapes), "--config", str(root / "tiny.json")]
    argv += ["--out", str(root / "model"), "--eval-data", str(shapes), "--eval-every", "6"]
    argv += ["--eval-match", "colour,shape"]
    return {"argv": argv, **ft.main(argv)}
