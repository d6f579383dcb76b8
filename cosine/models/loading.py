"""Loading causal LMs: local transformers checkpoints, hub ids already on disk, GGUF files.

GGUF files go through transformers' GGUF loader once; the dequantized weights are then written
as safetensors (with a plain config and the tokenizer) under the cache directory, so later starts
load in seconds. Nothing here downloads from a model hub: a model that is not on disk is a
``ModelNotFoundError`` with a hint, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from cosine.models.files import CONVERSION_MARK, NotConverted, file_hash, model_directory

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    fingerprint: str  # weights hash : dtype : device class


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_model(source: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """``cosine.models.files.model_directory``, converting a GGUF file on its first use."""
    try:
        return model_directory(source, cache_dir)
    except NotConverted as missing:
        return convert_missing(missing)


def convert_missing(missing: NotConverted) -> Path:
    """Make the safetensors copy ``model_directory`` found missing (its file hashed once)."""
    return convert_gguf(missing.path, missing.directory, missing.digest)


def load_model(source: str | os.PathLike, *, cache_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer from a directory, a GGUF file or a cached hub id."""
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    transformers_logging.disable_progress_bar()
    path = Path(source).expanduser()
    directory = resolve_model(source, cache_dir)
    # The weights' identity: a GGUF copy is named by its file's hash; a hub snapshot by its id.
    weights_id = directory.name if path.suffix == ".gguf" else _directory_hash(path) if path.is_dir() else str(source)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    model = model.to(torch_device).eval()
    if torch_device.type == "cpu":
        _own_the_weights(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    fingerprint = f"{weights_id}:{dtype}:{torch_device.type}"
    return LoadedModel(model, tokenizer, str(source), fingerprint)


def _own_the_weights(model: torch.nn.Module) -> None:
    """Copy weights that still lie in the checkpoint's memory map into the process's own memory.

    transformers leaves CPU tensors of the file's dtype mapped from the safetensors file. Every
    page read stays resident as file memory for as long as any tensor of the file lives, so a
    layer replaced by a fused or reordered copy (``cosine.models.fusing``,
    ``prepack_cpu_linears``) kept its original resident beside the copy: the verifier held the
    target's weights about twice over. Own copies are freed with the layer they belong to."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.layout == torch.strided:
                tensor.data = tensor.data.clone()


def convert_gguf(gguf_path: Path, target: Path, digest: str) -> Path:
    """Dequantize a GGUF file into ``target`` as safetensors (``digest``: the file's hash)."""
    log.info("converting %s to safetensors in %s (first start only)", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        _save_dequantized(model, tokenizer, staging, source_hash=digest)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written cache is never picked up
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_dequantized(model: PreTrainedModel, tokenizer, directory: Path, *, source_hash: str) -> None:
    # save_pretrained refuses models that carry the GGUF quantizer, so write the parts by hand.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    (directory / CONVERSION_MARK).write_text(json.dumps({"source_sha256": source_hash}))


def _directory_hash(directory: Path) -> str:
    # The weights' content, not their names and sizes: two checkpoints of the same shape differ
    # here, so verifiers of different weights never share a request (about 1 s per GB, once).
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".json"):
            digest.update(file.name.encode())
            digest.update(file_hash(file).encode())
    return f"{directory.name}-{digest.hexdigest()[:16]}"


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap pages for
    reuse: a process that loaded a model and dropped most of it, or replaced its layers by
    reordered copies, would go on holding the old pages). No-op where glibc is not the libc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prepack_cpu_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of a CPU model (fp32 or bf16) by oneDNN's linear on weights
    reordered once (``torch.utils.mkldnn.MkldnnLinear``); returns how many were replaced.

    Inference only (the reordered weights take no gradient). The results match the plain layers
    to float rounding; what changes is speed, and which is faster depends on the CPU: on one
    machine a forward over a few new tokens costs about one token's with them where plain GEMMs
    cost up to twice as much; on another each oneDNN call carries a fixed overhead that makes a
    decoding step slower. ``choose_cpu_linears`` measures instead of guessing.
    """
    swapped = _prepack(model)
    _free_dense_weights(model, swapped)
    return len(swapped)


def _free_dense_weights(model: torch.nn.Module, swapped: list[tuple[torch.nn.Module, str, torch.nn.Linear]]) -> None:
    """Free the plain weights of layers swapped for oneDNN's. ``MkldnnLinear`` keeps a reference
    to the weight it reordered, so each layer was held twice (~140 MB more for the demo target);
    a weight the model still uses elsewhere (an output layer tied to the embedding) is kept."""
    in_use = {id(tensor) for tensor in model.parameters()}
    for _, _, layer in swapped:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None and id(tensor) not in in_use:
                tensor.data = torch.empty(0, dtype=tensor.dtype)


def _prepack(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """``prepack_cpu_linears``, returning (parent, attribute, original layer) of each swap."""
    from torch.utils.mkldnn import MkldnnLinear

    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return []
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, MkldnnLinear(child, child.weight.dtype))
                swapped.append((parent, name, child))
    return swapped


Measure = Callable[[torch.nn.Module], float]


def choose_cpu_linears(model: PreTrainedModel, measure: Measure | None = None, rounds: int = 3) -> str:
    """Keep oneDNN's linears (``prepack_cpu_linears``) only where they make the model faster on
    this machine; returns what the model runs: ``"onednn"`` or ``"plain"``.

    ``measure(model)`` gives a cost in seconds (default ``time_short_forwards``: the verifier's
    typical passes of 1 and 4 new tokens). The two are measured in turn, ``rounds`` times each,
    and compared by their best: processes starting beside this one (a whole pipeline starts at
    once) slow both alike instead of whichever was measured first. oneDNN must beat plain by 3%
    to be kept; a model that cannot take it stays plain, unmeasured.
    """
    measure = measure or time_short_forwards
    swapped = _prepack(model)
    if not swapped:
        return "plain"
    packed = [(parent, name, getattr(parent, name)) for parent, name, _ in swapped]

    def use(layers: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
        for parent, name, layer in layers:
            setattr(parent, name, layer)

    plain, onednn = [], []
    for _ in range(max(1, rounds)):
        use(swapped)
        plain.append(measure(model))
        use(packed)
        onednn.append(measure(model))
    keep = min(onednn) < 0.97 * min(plain)
    use(packed if keep else swapped)
    if keep:
        _free_dense_weights(model, swapped)
    log.info("CPU linears: %s (best of %d: oneDNN %.1f ms, plain %.1f ms for a 1- and a 4-token pass)",
             "onednn" if keep else "plain", len(plain), min(onednn) * 1e3, min(plain) * 1e3)
    return "onednn" if keep else "plain"


def remembered_cpu_linears(model: PreTrainedModel, record: Path, key: str, measure: Measure | None = None) -> str:
    """``choose_cpu_linears`` once per ``key`` (the model, torch, threads, CPU): the choice is
    kept in the JSON file ``record``, and processes starting together wait on a lock beside it
    while one of them measures (a pipeline starts several at once; their measurements would
    slow each other and cost seconds of CPU each)."""
    import fcntl

    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        lock = open(record.with_suffix(".lock"), "w")  # closed by the with below
    except OSError as error:  # a read-only cache: measure, remember nothing
        log.warning("cannot keep the CPU linears' choice in %s (%s); measuring in this process", record, error)
        return choose_cpu_linears(model, measure)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(record.read_text()) if record.is_file() else {}
        except (OSError, ValueError):
            known = {}
        choice = known.get(key)
        if choice == "onednn":
            prepack_cpu_linears(model)
        elif choice != "plain":
            choice = choose_cpu_linears(model, measure)
            known[key] = choice
            partial = record.with_suffix(".tmp")
            try:
                partial.write_text(json.dumps(known, indent=1, sort_keys=True))
                partial.replace(record)
            except OSError as error:
                log.warning("cannot keep the CPU linears' choice in %s (%s)", record, error)
        else:
            log.info("CPU linears: plain (measured before on this machine: %s)", record)
    return choice


def cpu_key(model: PreTrainedModel, fingerprint: str) -> str:
    """What the linears' speed depends on: weights, dtype, torch, threads and the CPU."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{fingerprint} torch {torch.__version__} threads {torch.get_num_threads()} cpus {os.cpu_count()} {cpu}"


@torch.inference_mode()
def time_short_forwards(model: torch.nn.Module, lengths: tuple[int, ...] = (1, 4), repeats: int = 3) -> float:
    """Sum over ``lengths`` of the median wall time of a forward over that many tokens (no
    cache; linear layers dominate such passes), after one untimed call each."""
    total = 0.0
    for length in lengths:
        ids = torch.arange(10, 10 + length, device=next(model.parameters()).device)[None]
        times = []
        for i in range(repeats + 1):
            began = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if i >= 1:
                times.append(time.perf_counter() - began)
        total += sorted(times)[len(times) // 2]
    return total
