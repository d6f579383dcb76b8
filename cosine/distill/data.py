"""Training data for a drafter, labelled by the target and cached on disk.

Steps (each resumable: what is on disk is not made again):

1. **chat**: prompts (made from the offline sources, or a user's) answered by the target,
   greedy, in batches: the drafter must see the target's own answers in its chat format.
2. **text**: documents tokenized and packed into sequences of ``seq_len`` tokens.
3. **vocabulary**: the ``reduced_vocab`` most frequent token ids over every tokenized document
   and answer (a larger corpus than the training sequences), special tokens always in.
4. **labels**: the target forced over every sequence; its final (post-norm) hidden state per
   token is stored in fp16 (1.1 KB per token for a 576-wide target). Soft labels are recomputed
   from it at training time over the reduced head (``hidden @ embedding[vocab].T``), so the cache
   holds both the ``feature`` drafter's input and every label, at 1/170 of full fp32 logits.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cosine.distill.corpus import Document

log = logging.getLogger(__name__)
Progress = Callable[[str, int], "ProgressBar"]


class ProgressBar:
    """The interface the steps report to (``cosine distill`` passes tqdm bars)."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def no_progress(_: str, __: int) -> ProgressBar:
    return ProgressBar()


@dataclass(frozen=True, slots=True)
class DataPlan:
    text_tokens: int  # tokens of forced text
    chat_prompts: int  # prompts the target answers
    answer_tokens: int  # most tokens per answer
    seq_len: int
    reduced_vocab: int
    vocab_corpus_tokens: int = 2_000_000  # tokens counted for the reduced vocabulary
    sampled_prompts: int = 0  # user prompts the target writes itself (answered like the others)
    avoid: tuple[str, ...] = ()  # texts no target-written prompt may share five words in a row with
    holdout_share: float = 0.05  # of the chat sequences, kept out of training for agreement
    batch_size: int = 8  # sequences per labelling forward
    generation_batch: int = 8  # prompts answered together
    seed: int = 0


def generate_answers(model, tokenizer, prompts: list[list[dict]], plan: DataPlan, path: Path, progress: Progress) -> list[list[int]]:
    """The target's greedy answers (prompt ids + answer ids, ending at its end token), appended
    to ``path`` as JSON lines as they are made; rows already there are kept."""
    from cosine.core.protocol import prompt_token_ids

    done = [json.loads(line)["ids"] for line in path.read_text().splitlines()] if path.exists() else []
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bar = progress("target answers", len(prompts))
    bar.update(len(done))
    with path.open("a") as out:
        for start in range(len(done), len(prompts), plan.generation_batch):
            batch = [prompt_token_ids(tokenizer, messages=m) for m in prompts[start : start + plan.generation_batch]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            with torch.inference_mode():
                output = model.generate(
                    input_ids, attention_mask=mask, max_new_tokens=plan.answer_tokens, do_sample=False,
                    pad_token_id=pad, eos_token_id=eos,
                )
            for ids, row in zip(batch, output[:, width:].tolist()):
                answer = row[: row.index(eos) + 1] if eos in row else row
                out.write(json.dumps({"ids": ids + answer}) + "\n")
                done.append(ids + answer)
            out.flush()
            bar.update(len(batch))
    bar.close()
    return done


def sample_user_prompts(model, tokenizer, count: int, path: Path, progress: Progress, *, batch: int = 16, max_tokens: int = 96, seed: int = 0, avoid: list[str] = ()) -> list[str]:
    """User turns written by the target itself: its chat template up to the user's turn, then
    sampled (temperature 1, top-p 0.95) to its end token. An instruction-tuned target writes
    prompts like those it was tuned on, which is the distribution its users' prompts come from.
    Prompts sharing five words in a row with one of ``avoid`` are dropped. Appended to ``path``
    as they come; rows already there are kept."""
    done = [json.loads(line)["prompt"] for line in path.read_text().splitlines()] if path.exists() else []
    marker = "\u2063MARK\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = tokenizer(rendered.split(marker)[0], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    banned = {tuple(words[i : i + 5]) for text in avoid for words in [text.lower().split()] for i in range(len(words) - 4)}
    bar = progress("target-written prompts", count)
    bar.update(min(len(done), count))
    generator_seed = seed + len(done)
    with path.open("a") as out:
        while len(done) < count:
            torch.manual_seed(generator_seed)
            generator_seed += 1
            ids = torch.tensor([prefix] * batch, device=device)
            with torch.inference_mode():
                rows = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=True, temperature=1.0, top_p=0.95, top_k=0, pad_token_id=eos, eos_token_id=eos)
            for row in rows[:, len(prefix) :].tolist():
                if eos not in row:
                    continue  # cut off: not a whole prompt
                text = tokenizer.decode(row[: row.index(eos)], skip_special_tokens=True).strip()
                words = text.lower().split()
                if not 3 <= len(words) <= 120 or any(tuple(words[i : i + 5]) in banned for i in range(len(words) - 4)):
                    continue
                if len(done) < count:
                    out.write(json.dumps({"prompt": text}) + "\n")
                    done.append(text)
                    bar.update(1)
            out.flush()
    bar.close()
    return done[:count]


def tokenize_documents(tokenizer, documents: list[Document], max_tokens: int, count_tokens: int) -> tuple[list[int], Counter]:
    """Documents' tokens end to end (an end token between them), up to ``max_tokens`` for
    training; the frequency count goes on to ``count_tokens`` (a larger corpus than the
    training text, so the vocabulary is not fitted to the training labels alone)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    counts: Counter = Counter()
    counted = 0
    for start in range(0, len(documents), 32):  # a list at a time: the fast tokenizer uses every core
        if len(stream) >= max_tokens and counted >= count_tokens:
            break
        for ids in tokenizer([d.text for d in documents[start : start + 32]], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
            counted += len(ids)
            if len(stream) < max_tokens:
                stream.extend(ids + [eos])
    return stream[:max_tokens], counts


def pack(stream: list[int], seq_len: int) -> torch.Tensor:
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int32).view(rows, seq_len)


def pack_conversations(conversations: list[list[int]], seq_len: int) -> torch.Tensor:
    """Conversations laid end to end and cut into rows (a row may span two of them)."""
    return pack([t for ids in conversations for t in ids], seq_len)


def reduced_vocabulary(counts: Counter, size: int, vocab_size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent ids (ties by id), ``always`` included; sorted ascending."""
    keep = [t for t in dict.fromkeys(always) if 0 <= t < vocab_size]
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in set(keep) and 0 <= t < vocab_size]
    chosen = keep + ranked[: max(0, size - len(keep))]
    if len(chosen) < size:  # a small corpus: fill with the lowest unused ids
        used = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in used][: size - len(chosen)]
    return torch.tensor(sorted(chosen[:size]), dtype=torch.int32)


def label_sequences(model, sequences: torch.Tensor, directory: Path, name: str, plan: DataPlan, progress: Progress, shard_rows: int = 512) -> list[Path]:
    """The target's final hidden states over ``sequences`` [N, L], fp16, in shards of
    ``shard_rows`` rows (``{name}-{k}.safetensors``); shards already complete are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    paths = []
    shards = math.ceil(len(sequences) / shard_rows)
    bar = progress(f"target labels ({name})", len(sequences))
    for k in range(shards):
        rows = sequences[k * shard_rows : (k + 1) * shard_rows]
        path = directory / f"{name}-{k:04d}.safetensors"
        paths.append(path)
        if path.exists():
            bar.update(len(rows))
            continue
        hidden = []
        for start in range(0, len(rows), plan.batch_size):
            batch = rows[start : start + plan.batch_size].long().to(device)
            with torch.inference_mode():
                states = decoder(input_ids=batch).last_hidden_state
            hidden.append(states.to(torch.float16).cpu())
            bar.update(len(batch))
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": rows.contiguous(), "hidden": torch.cat(hidden).contiguous()}, str(tmp))
        tmp.rename(path)
    bar.close()
    return paths


def load_shards(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, hidden = [], []
    for path in paths:
        data = load_file(str(path))
        tokens.append(data["tokens"])
        hidden.append(data["hidden"])
    if not tokens:
        raise ValueError("no training data")
    return torch.cat(tokens), torch.cat(hidden)


def target_argmax(model, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The target's full-vocabulary greedy choice after every position (for agreement)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        with torch.inference_mode():
            logits = model(input_ids=sequences[start : start + batch_size].long().to(device)).logits
        out.append(logits.argmax(-1).to(torch.int32).cpu())
    return torch.cat(out) if out else torch.zeros(0, sequences.shape[1], dtype=torch.int32)
