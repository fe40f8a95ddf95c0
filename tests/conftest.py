"""Shared fixtures: tiny random causal LMs and a tiny byte-level BPE tokenizer.

Nothing here touches a model hub: the tokenizer is trained on a few sentences
and the models are built from configs with seeded random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ARCHS = ("llama", "qwen2", "gemma3", "gpt2")

_CORPUS = [
    "Review: a great movie with a fine cast\nSentiment: positive",
    "Review: dull, slow and far too long\nSentiment: negative",
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue?\nAnswer: yes",
    "Premise: a man sleeps. Hypothesis: a man is awake. True or False? False",
    "World Sports Business Technology news of the day",
    "0 1 2 3 4 5 6 7 8 9 #### answer",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def make_tokenizer(padding_side: str = "right", bos: bool = True):
    """A byte-level BPE tokenizer (vocab ~300) that adds <bos> like Llama/Gemma,
    or with `bos=False` none at all, like Qwen2.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if not bos:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
        fast.padding_side = padding_side
        return fast
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.padding_side = padding_side
    return fast


def make_model(arch: str, vocab_size: int, num_layers: int = 4, seed: int = 0):
    """A tiny random causal LM of the given architecture, in eval mode, fp32."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, **common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               max_position_embeddings=512, sliding_window=16,
                               **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=num_layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Save each tiny architecture (with the tokenizer) to disk; returns {arch: path}."""
    out = {}
    tok = make_tokenizer()
    for a in ARCHS:
        d = tmp_path_factory.mktemp(f"tiny-{a}")
        m = make_model(a, len(tok))
        m.save_pretrained(d)
        tok.save_pretrained(d)
        out[a] = d
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def shared_data_dir() -> Path | None:
    d = Path(os.environ.get("ACTCACHE_DATA_DIR", SHARED_DATA))
    return d if d.exists() else None


# ----------------------------------------------------------------------------- tiny data

TEXTS = [
    ("a great movie with a fine cast", 1), ("dull, slow and far too long", 0),
    ("the quick brown fox", 1), ("is the sky blue", 0), ("a man sleeps on the sofa all day", 0),
    ("fine", 1), ("news of the day in sports and business", 1), ("far too slow", 0),
    ("great fun", 1), ("the lazy dog jumps over nothing at all, which is a shame", 0),
    ("blue sky", 1), ("slow", 0),
]


def review_rows() -> list[dict]:
    """TEXTS as JSONL rows: ids x0, x1, ..., every fourth an eval row, the rest the pool."""
    return [{"id": f"x{i}", "review": t, "label": lab, "split": "eval" if i % 4 == 0 else "train"}
            for i, (t, lab) in enumerate(TEXTS)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXTRA_EVAL = [("a fine cast and a great day", 1), ("too long and far too dull", 0), ("blue sky news", 1),
              ("slow sofa day", 0), ("quick and fine", 1), ("a dull man", 0), ("great sports news", 1),
              ("far too slow a fox", 0)]


def write_reviews(folder: Path, study: bool = False) -> Path:
    """TEXTS as folder/reviews.jsonl: ids x0.., every 4th row in the eval split;
    with `study`, EXTRA_EVAL follows as eval rows y0.. (enough label-balanced
    probes for both halves of a study, and eval inputs beside them)."""
    rows = [{"id": f"x{i}", "review": t, "label": lab, "split": "eval" if i % 4 == 0 else "train"}
            for i, (t, lab) in enumerate(TEXTS)]
    if study:
        rows += [{"id": f"y{i}", "review": t, "label": lab, "split": "eval"} for i, (t, lab) in enumerate(EXTRA_EVAL)]
    return write_jsonl(folder / "reviews.jsonl", rows)


@pytest.fixture()
def jsonl(tmp_path):
    return write_reviews(tmp_path)


@pytest.fixture()
def study_jsonl(tmp_path):
    return write_reviews(tmp_path, study=True)


def cfg_for(model_dir, jsonl, home, **kw):
    """A BuildConfig for a tiny model dir + the reviews JSONL, stored under `home`."""
    from actcache.builder import BuildConfig
    from actcache.data import DataSpec
    from actcache.models import ModelSpec

    data = DataSpec(path=str(jsonl), text_fields=("review",), label_field="label", split_field="split",
                    id_field="id", template="Review: {review}\nSentiment:",
                    label_words=(" negative", " positive"))
    base = dict(model=ModelSpec(str(model_dir), dtype="float32"), data=data, home=str(home), batch_size=3, context_k=2)
    base.update(kw)
    return BuildConfig(**base)




def assert_same_arrays(got, want) -> None:
    """Every pooled array and statistic of build `want` equals `got`'s, bit for bit."""
    import numpy as np

    for a in want.arrays:
        np.testing.assert_array_equal(got.acts(a.component, a.layer, a.pooling, a.mask),
                                      want.acts(a.component, a.layer, a.pooling, a.mask))
        np.testing.assert_array_equal(got.stats(a.component, a.layer, a.mask),
                                      want.stats(a.component, a.layer, a.mask))


def write_sae(folder: Path, d_in: int = 64, d_sae: int = 48, hook: str = "mlp_out", layer: int = 1,
              seed: int = 0) -> str:
    """A seeded random ReLU SAE in the SAELens layout (save_sae); returns its directory."""
    import numpy as np

    from actcache.sae import SAE, save_sae

    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
    b = rng.normal(scale=0.1, size=d_sae).astype(np.float32)
    save_sae(SAE(W_enc=W, b_enc=b, W_dec=W.T.copy(), b_dec=np.zeros(d_in, np.float32), kind="relu",
                 hook=hook, layer=layer), folder)
    return str(folder)
