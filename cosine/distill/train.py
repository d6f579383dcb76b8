"""``cosine distill``: data, labels, training and export of a drafter for the configured target.

Everything lands in one work directory; a run that stops (Ctrl-C, a crash, a lost machine) goes
on from what is there: answers and label shards already made are kept, training resumes from
its last checkpoint (``checkpoint.pt``: weights, optimizer, step, data order). The drafter is
written as ``drafter.safetensors`` (its own tensors in fp16 or bf16, and its vocabulary map)
with ``drafter.json`` (shape, target, data, training, measured agreement).

Training loss: soft cross-entropy to the target's distribution over the reduced vocabulary
(KL to the target up to a constant), and for ``feature`` drafters a smooth-L1 pull of the
predicted feature towards the target's, over ``unroll`` draft steps: step k feeds the features
predicted at step k-1 (shifted by one position) instead of the target's, as drafting does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cosine.distill import corpus
from cosine.distill.data import (
    DataPlan,
    Progress,
    generate_answers,
    label_sequences,
    load_shards,
    no_progress,
    pack,
    pack_conversations,
    reduced_vocabulary,
    sample_user_prompts,
    target_argmax,
    tokenize_documents,
)
from cosine.drafters.artifact import export, tokenizer_digest, unpack_tensors
from cosine.drafters.net import DraftNet, DraftSpec, spec_for_target
from cosine.drafters.profile import PROFILE_FILE

log = logging.getLogger(__name__)
FEATURE_LOSS_WEIGHT = 0.1
STEP_DECAY = 0.8


@dataclass(frozen=True, slots=True)
class TrainPlan:
    kind: str = "feature"
    layers: int = 2  # small: blocks (feature drafters have one)
    epochs: int = 2
    batch_size: int = 16  # sequences per step
    lr: float = 5e-4
    warmup_steps: int = 50
    unroll: int = 3  # feature: draft steps trained together
    checkpoint_every: int = 200  # steps
    dtype: str = "float16"  # of the exported tensors
    seed: int = 0
    train_tokens: int = 0  # > 0: train on a seeded random subset of this many tokens' sequences
    steps: int = 0  # > 0: this many steps (epochs over the data repeat as needed), else epochs


def prepare_data(model, tokenizer, plan: DataPlan, work: Path, documents: list[corpus.Document], prompts: list[list[dict]], progress: Progress = no_progress) -> dict:
    """Answers, packed sequences, vocabulary and label shards in ``work/data``; returns a summary."""
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(data_dir / "plan.json", plan, len(documents), len(prompts))
    ready = data_dir / "ready.json"
    if ready.exists():  # every step done before: nothing to tokenize or check again
        done = json.loads(ready.read_text())
        paths = {k: [data_dir / name for name in done[k]] for k in ("train", "holdout")}
        if all(path.exists() for k in paths for path in paths[k]):
            return {"summary": done["summary"], **paths}
    if plan.sampled_prompts:
        written = sample_user_prompts(model, tokenizer, plan.sampled_prompts, data_dir / "sampled_prompts.jsonl", progress,
                                      batch=plan.generation_batch, seed=plan.seed, avoid=list(plan.avoid))
        prompts = list(prompts) + [[{"role": "user", "content": text}] for text in written]
    answers = generate_answers(model, tokenizer, prompts, plan, data_dir / "answers.jsonl", progress) if prompts else []
    rng = random.Random(plan.seed)
    order = list(range(len(answers)))
    rng.shuffle(order)
    held = max(1, int(len(answers) * plan.holdout_share)) if len(answers) >= 4 else 0
    holdout_answers = [answers[i] for i in order[:held]]
    train_answers = [answers[i] for i in order[held:]]
    stream, counts = tokenize_documents(tokenizer, documents, plan.text_tokens, plan.vocab_corpus_tokens)
    counted_text_tokens = sum(counts.values())
    answer_tokens = sum(map(len, answers))
    weight = max(1, round(sum(counts.values()) / answer_tokens)) if answer_tokens else 1
    for ids in answers:  # the chat answers weigh as much as the whole text corpus
        for token in ids:
            counts[token] += weight
    text_rows = pack(stream, plan.seq_len)
    chat_rows = pack_conversations(train_answers, plan.seq_len)
    holdout_rows = pack_conversations(holdout_answers, min(plan.seq_len, sum(map(len, holdout_answers))) or 1)
    special = [t for t in (tokenizer.all_special_ids or []) if t is not None]
    vocab = reduced_vocabulary(counts, plan.reduced_vocab, len(tokenizer), special + [tokenizer.eos_token_id])
    save_file({"vocab": vocab}, str(data_dir / "vocab.safetensors"))
    train_rows = torch.cat([text_rows, chat_rows]) if len(chat_rows) else text_rows
    paths = label_sequences(model, train_rows, data_dir, "train", plan, progress)
    holdout_paths = label_sequences(model, holdout_rows, data_dir, "holdout", plan, progress) if len(holdout_rows) else []
    if holdout_paths and not (data_dir / "holdout-argmax.safetensors").exists():
        save_file({"argmax": target_argmax(model, holdout_rows, plan.batch_size)}, str(data_dir / "holdout-argmax.safetensors"))
    corpus_tokens = sum(counts.values())
    coverage = sum(counts[t] for t in vocab.tolist()) / max(1, corpus_tokens)
    summary = {
        "text_tokens": int(text_rows.numel()), "chat_tokens": int(chat_rows.numel()), "holdout_tokens": int(holdout_rows.numel()),
        "answers": len(answers), "holdout_answers": len(holdout_answers), "seq_len": plan.seq_len,
        "frequency_corpus_tokens": counted_text_tokens, "frequency_answer_weight": weight, "reduced_vocab": len(vocab), "vocab_coverage": round(coverage, 4),
        "sources": sorted({d.source for d in documents}),
    }
    (data_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ready.write_text(json.dumps({"summary": summary, "train": [p.name for p in paths], "holdout": [p.name for p in holdout_paths]}))
    return {"summary": summary, "train": paths, "holdout": holdout_paths}


def _check_plan(path: Path, plan: DataPlan, documents: int, prompts: int) -> None:
    """A work directory serves one data plan: resuming with another would mix its shards."""
    wanted = {k: v for k, v in asdict(plan).items() if k not in ("batch_size", "generation_batch")}
    wanted["avoid"] = hashlib.blake2b(json.dumps(wanted["avoid"]).encode(), digest_size=8).hexdigest()
    wanted |= {"documents": documents, "prompts": prompts}
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            changed = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
            raise ValueError(f"{path.parent.parent} holds data made with other settings ({', '.join(changed)}); use another --work to start afresh")
    else:
        path.write_text(json.dumps(wanted, indent=2))


def build_net(target, spec: DraftSpec, vocab: torch.Tensor) -> DraftNet:
    embedding = target.get_input_embeddings().weight
    net = DraftNet(spec, embedding, vocab).to(embedding.device)
    return net


def _teacher_logits(net: DraftNet, hidden: torch.Tensor) -> torch.Tensor:
    return net.logits(hidden.to(net.head.dtype))


def step_losses(net: DraftNet, tokens: torch.Tensor, hidden: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """Loss per draft step for a batch: tokens [B, L] (long), hidden [B, L, d] (target states)."""
    b, length = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(b, length)
    if net.spec.kind == "small":
        out, _ = net(tokens, positions)
        return [soft_cross_entropy(net.logits(out), _teacher_logits(net, hidden))]
    # feature: the pair (f_i, token_{i+1}) at position i+1 predicts f_{i+1} and token_{i+2}.
    inputs, targets = tokens[:, 1:], hidden[:, 1:].to(net.head.dtype)
    teacher = _teacher_logits(net, hidden[:, 1:])
    features = hidden[:, :-1].to(net.head.dtype)
    losses = []
    for _ in range(unroll):
        out, _ = net(inputs, positions[:, 1:], features)
        losses.append(soft_cross_entropy(net.logits(out), teacher) + FEATURE_LOSS_WEIGHT * F.smooth_l1_loss(out.float(), targets.float()))
        features = torch.cat((hidden[:, :1].to(out.dtype), out[:, :-1]), dim=1)
    return losses


@torch.no_grad()
def agreement(net: DraftNet, tokens: torch.Tensor, hidden: torch.Tensor, argmax: torch.Tensor, unroll: int, batch_size: int) -> list[float]:
    """Share of positions where the drafter's top token is the target's full-vocabulary greedy
    choice, per draft step (step k: fed its own features of steps < k, as in training)."""
    if not len(tokens):
        return []
    device = net.head.device
    hits = [0] * (unroll if net.spec.kind == "feature" else 1)
    total = 0
    for start in range(0, len(tokens), batch_size):
        t = tokens[start : start + batch_size].long().to(device)
        h = hidden[start : start + batch_size].to(device)
        a = argmax[start : start + batch_size].long().to(device)
        b, length = t.shape
        positions = torch.arange(length, device=device).expand(b, length)
        if net.spec.kind == "small":
            out, _ = net(t, positions)
            hits[0] += int((net.vocab[net.logits(out).argmax(-1)] == a).sum())
            total += a.numel()
            continue
        features = h[:, :-1].to(net.head.dtype)
        for k in range(unroll):
            out, _ = net(t[:, 1:], positions[:, 1:], features)
            hits[k] += int((net.vocab[net.logits(out).argmax(-1)] == a[:, 1:]).sum())
            features = torch.cat((h[:, :1].to(out.dtype), out[:, :-1]), dim=1)
        total += a[:, 1:].numel()
    return [round(x / max(1, total), 4) for x in hits]


def train(target, net: DraftNet, train_paths: list[Path], plan: TrainPlan, work: Path, progress: Progress = no_progress, holdout=None) -> dict:
    device = net.head.device
    tokens, hidden = load_shards(train_paths)
    if plan.train_tokens:
        rows = max(1, math.ceil(plan.train_tokens / tokens.shape[1]))
        keep = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(plan.seed + 1))[:rows].sort().values
        tokens, hidden = tokens[keep], hidden[keep]
    if device.type == "cuda":
        tokens, hidden = tokens.to(device), hidden.to(device)
    params = [p for n, p in net.named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.95))
    steps_per_epoch = max(1, len(tokens) // plan.batch_size)
    total_steps = plan.steps or steps_per_epoch * plan.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    checkpoint = work / f"checkpoint-{net.spec.kind}.pt"
    step, seconds, history = 0, 0.0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("plan") != asdict(plan):
            raise ValueError(f"{checkpoint} was made with other training settings; delete it (or use another --work) to train afresh")
        net.load_state_dict(state["net"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        log.info("resuming from step %d of %d", step, total_steps)
    generator = torch.Generator().manual_seed(plan.seed)
    orders = [torch.randperm(len(tokens), generator=generator) for _ in range(epochs)]
    bar = progress("training", total_steps)
    bar.update(step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    running = []
    began = time.perf_counter()
    net.train()
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        rows = orders[epoch][index * plan.batch_size : (index + 1) * plan.batch_size]
        t = tokens[rows.to(tokens.device)].long().to(device)
        h = hidden[rows.to(hidden.device)].to(device)
        lr = plan.lr * min(1.0, (step + 1) / plan.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            losses = step_losses(net, t, h, plan.unroll)
            loss = sum(STEP_DECAY**k * value for k, value in enumerate(losses))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.append(loss.item())
        step += 1
        bar.update(1)
        if step % plan.checkpoint_every == 0 or step == total_steps:
            history.append({"step": step, "loss": round(sum(running) / len(running), 4)})
            running = []
            elapsed = seconds + time.perf_counter() - began
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": elapsed, "history": history, "plan": asdict(plan)}, tmp)
            tmp.rename(checkpoint)
    bar.close()
    net.eval()
    seconds += time.perf_counter() - began
    return {"steps": total_steps, "epochs": round(total_steps / steps_per_epoch, 2), "seconds": round(seconds, 1), "train_tokens": int(tokens.numel()), "loss_history": history}


def _start_from(net: DraftNet, init: Path) -> dict:
    """Load a drafter's own tensors (not its vocabulary: the head rows come from the target, so
    a drafter can go on with another reduced vocabulary). Returns what it was."""
    meta = json.loads((Path(init) / "drafter.json").read_text())
    spec = DraftSpec.from_dict(meta["spec"])
    if (spec.kind, spec.layers, spec.hidden) != (net.spec.kind, net.spec.layers, net.spec.hidden):
        raise ValueError(f"--init {init}: a {spec.kind} drafter with {spec.layers} layers of width {spec.hidden}, not {net.spec.kind} / {net.spec.layers} / {net.spec.hidden}")
    tensors = unpack_tensors(load_file(str(Path(init) / "drafter.safetensors")))
    net.load_state_dict({k: v.to(net.head.dtype) for k, v in tensors.items()}, strict=False)
    return {"path": str(init), "data": meta.get("data"), "training": {k: meta.get("training", {}).get(k) for k in ("steps", "epochs", "seconds", "device_name", "train_tokens")}, "measured": meta.get("measured")}


def union_data(work_dirs: list[Path]) -> dict:
    """The labelled data of earlier runs together (their shards in place): for a drafter trained
    on the union of several experts' data."""
    train_paths, holdout_paths, argmax, summaries = [], [], [], {}
    for work in work_dirs:
        ready = work / "data" / "ready.json"
        if not ready.is_file():
            raise ValueError(f"{work}: no finished data (data/ready.json); run its own `cosine distill` first")
        done = json.loads(ready.read_text())
        train_paths += [work / "data" / name for name in done["train"]]
        if done["holdout"]:
            holdout_paths += [work / "data" / name for name in done["holdout"]]
            argmax.append(load_file(str(work / "data" / "holdout-argmax.safetensors"))["argmax"])
        summaries[str(work)] = done["summary"]
    summary = {"union_of": summaries, "text_tokens": sum(s["text_tokens"] for s in summaries.values()),
               "chat_tokens": sum(s["chat_tokens"] for s in summaries.values()), "answers": sum(s["answers"] for s in summaries.values())}
    widths = {load_file(str(p))["tokens"].shape[1] for p in holdout_paths}
    if len(widths) > 1:  # holdout rows of unequal length cannot be stacked: measure on the first run's
        holdout_paths, argmax = [p for p in holdout_paths if p.parent == holdout_paths[0].parent], argmax[:1]
    return {"summary": summary, "train": train_paths, "holdout": holdout_paths, "argmax": torch.cat(argmax) if argmax else None}


PROFILE_TOKENS = 8192  # token ids kept in a drafter's routing profile (the most frequent)


def write_profile(work_dirs: list[Path], out: Path) -> int:
    """``out/profile.safetensors``: the token counts of the conversations a drafter was trained
    on (prompt and answer), its most frequent ``PROFILE_TOKENS`` ids: what the router's
    cold-start classifier reads to tell which expert a prompt belongs to. Returns the tokens
    counted (0: no conversations, no file)."""
    counts: Counter = Counter()
    for work in work_dirs:
        answers = work / "data" / "answers.jsonl"
        if answers.is_file():
            for line in answers.read_text().splitlines():
                counts.update(json.loads(line)["ids"])
    if not counts:
        return 0
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:PROFILE_TOKENS]
    save_file({"ids": torch.tensor([t for t, _ in kept], dtype=torch.int32), "counts": torch.tensor([c for _, c in kept], dtype=torch.int32)}, str(out / PROFILE_FILE))
    return sum(counts.values())


def distill(target_model, tokenizer, *, kind: str, work: Path, out: Path, data_plan: DataPlan, train_plan: TrainPlan, documents, prompts, progress: Progress = no_progress, target_name: str = "", init: Path | None = None, union_of: list[Path] = ()) -> dict:
    """The whole run: data, labels, training, agreement, export. Returns drafter.json's content.

    ``init``: start from that drafter's tensors and keep its vocabulary (an expert adapted from
    the general drafter drafts over the same tokens). ``union_of``: train on those runs' labelled
    data instead of making any."""
    torch.manual_seed(train_plan.seed)
    if next(target_model.parameters()).device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # labels: TF32 is ample for soft targets
    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    data = union_data(list(union_of)) if union_of else prepare_data(target_model, tokenizer, data_plan, work, documents, prompts, progress)
    data_seconds = time.perf_counter() - began
    if init is not None:
        vocab = load_file(str(Path(init) / "drafter.safetensors"))["vocab"]
    else:
        vocab = load_file(str(work / "data" / "vocab.safetensors"))["vocab"]
    spec = spec_for_target(target_model.config, kind, train_plan.layers, len(vocab))
    net = build_net(target_model, spec, vocab)
    net.init_from_target(target_model)
    started_from = None
    if init is not None:
        started_from = _start_from(net, init)
    training = train(target_model, net, data["train"], train_plan, work, progress)
    measured = {}
    if data["holdout"]:
        tokens, hidden = load_shards(data["holdout"])
        argmax = data["argmax"] if union_of else load_file(str(work / "data" / "holdout-argmax.safetensors"))["argmax"]
        measured["holdout_agreement_per_step"] = agreement(net, tokens, hidden, argmax, train_plan.unroll, train_plan.batch_size)
    device = net.head.device
    meta = {
        "kind": kind,
        "target": {"name": target_name, "tokenizer": tokenizer_digest(tokenizer), "hidden": spec.hidden, "vocab_size": spec.vocab_size},
        "data": data["summary"],
        "training": {**{k: v for k, v in asdict(train_plan).items()}, **training, "data_seconds": round(data_seconds, 1), "device": device.type,
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch_threads": torch.get_num_threads()},
        "measured": measured,
    }
    if started_from:
        meta["init"] = started_from
        # The data's own ranked vocabulary (its summary's reduced_vocab, vocab_coverage) is not used.
        meta["data"] = {**meta["data"], "vocabulary": "the --init drafter's"}
    export(net, train_plan.dtype, out, meta)
    write_profile(list(union_of) if union_of else [work], out)
    return meta


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of -sum_v p_teacher(v) log p_student(v) (KL to the teacher + const)."""
    teacher = torch.softmax(teacher_logits.float(), dim=-1)
    return -(teacher * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()
