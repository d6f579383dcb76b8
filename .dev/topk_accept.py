"""Acceptance sum_x min(p, q) of general-small against the target, q full vs q restricted to top-K."""
import json, torch
from pathlib import Path
from cosine.config import load_config
from cosine.factory import load_target
from cosine.drafters.distilled import SmallDrafter
from cosine.core.sampling import SamplingParams, warp_probs
from cosine.models.runner import ForwardItem, ModelRunner
cfg = load_config(Path("config.toml"), environ={})
t = load_target(cfg)
spec = [d for d in cfg.drafters if d.name == "general-small"][0]
dr = SmallDrafter(spec.name, spec.resolved_path, t.model, t.tokenizer)
runner = ModelRunner(t.model)
prompts = [json.loads(l) for l in open("bench/prompts.jsonl")][:12]
res = {}
for T in (0.7, 1.0):
    params = SamplingParams(temperature=T)
    acc = {k: [] for k in (0, 16, 32, 64, 128)}
    for i, p in enumerate(prompts):
        text = p["messages"][-1]["content"]
        ids = t.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids['input_ids']) if not isinstance(ids, list) else ids
        with torch.inference_mode():
            out = t.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
        for cut in range(len(ids), len(out), 3):
            ctx = out[:cut]
            with torch.inference_mode():
                pl = t.model(torch.tensor([ctx])).logits[0, -1]
                p_t = warp_probs(pl[None], params)[0]
                st = dr._state(f"k{i}-{cut}")
                ql = dr._feed(st, ctx, 0)
                q_red = warp_probs(ql[None].float(), params)[0]
                q = torch.zeros_like(p_t); q[dr.net.vocab] = q_red
            for k in acc:
                if k:
                    v, ix = q.topk(k); qk = torch.zeros_like(q); qk[ix] = v / v.sum()
                else:
                    qk = q
                acc[k].append(float(torch.minimum(p_t, qk).sum()))
    res[T] = {k: sum(v) / len(v) for k, v in acc.items()}
    print(T, res[T], len(acc[0]))
