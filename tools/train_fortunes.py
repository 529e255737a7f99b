#!/usr/bin/env python3
"""Trains fortune-moe: a small DeepSeek-V3-architecture byte-level model on Debian's `fortunes` text.

Vocabulary: ids 0..255 are bytes, 256 = BOS, 257 = EOS (vocab_size 258).
Corpus: the plain fortune files (no .dat / .u8); fortunes are separated by lines holding only "%".
A fortune's bytes are its lines, each with its terminating "\\n". Fortunes with no non-space byte are dropped.

Deterministic split over the fortunes in corpus order (files sorted by name, then file order), index i:
  held-out   : i % 50 == 7,  len <= 511 bytes, while the running total (bytes + 2 per fortune) stays <= 32768
  validation : i % 50 == 23, len <= 511 bytes, same cap (used only to pick the best checkpoint)
  train      : everything else
Held-out bits per byte: each fortune is fed as BOS + bytes (<= 512 tokens, so never truncated); every byte is
predicted (BOS and EOS are not); bpb = total NLL in bits / total bytes; float32 weights and math.

  python3 tools/train_fortunes.py split --corpus /usr/share/games/fortunes --heldout tests/data/fortune-moe/heldout.txt
  python3 tools/train_fortunes.py train --corpus device/ref/fortunes --out OUT --seconds 330
  python3 tools/train_fortunes.py eval  --model tests/data/fortune-moe --heldout tests/data/fortune-moe/heldout.txt
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

BOS, EOS, VOCAB = 256, 257, 258
MAX_LEN = 512
HELD_MOD, HELD_REM, VAL_REM, CAP = 50, 7, 23, 32768

MODEL = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
    kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
    n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
    hidden_act="silu", max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None, rope_interleave=True,
)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- corpus (no torch needed)

def parse_fortunes(data):
    """bytes of a fortune file -> list of fortunes (bytes, each line ending in b'\\n')."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines = lines[:-1]
    out, cur = [], []
    for line in lines + [b"%"]:
        if line == b"%":
            text = b"".join(l + b"\n" for l in cur)
            if text.strip():
                out.append(text)
            cur = []
        else:
            cur.append(line)
    return out


def read_corpus(d):
    if not os.path.isdir(d):
        sys.exit(f"train_fortunes: corpus directory '{d}' does not exist")
    names = sorted(n for n in os.listdir(d)
                   if not n.startswith(".") and not n.endswith((".dat", ".u8"))
                   and os.path.isfile(os.path.join(d, n)))
    if not names:
        sys.exit(f"train_fortunes: no fortune files in '{d}'")
    fortunes = []
    for n in names:
        with open(os.path.join(d, n), "rb") as f:
            fortunes.extend(parse_fortunes(f.read()))
    return names, fortunes


def split(fortunes):
    held, val, train = [], [], []
    th = tv = 0
    for i, f in enumerate(fortunes):
        r = i % HELD_MOD
        if r == HELD_REM and len(f) <= MAX_LEN - 1 and th + len(f) + 2 <= CAP:
            held.append(f)
            th += len(f) + 2
        elif r == VAL_REM and len(f) <= MAX_LEN - 1 and tv + len(f) + 2 <= CAP:
            val.append(f)
            tv += len(f) + 2
        else:
            train.append(f)
    return held, val, train


def fortunes_file_bytes(fs):
    return b"".join(f + b"%\n" for f in fs)


def cmd_split(args):
    names, fortunes = read_corpus(args.corpus)
    held, val, train = split(fortunes)
    blob = fortunes_file_bytes(held)
    os.makedirs(os.path.dirname(os.path.abspath(args.heldout)), exist_ok=True)
    with open(args.heldout, "wb") as f:
        f.write(blob)
    assert parse_fortunes(blob) == held
    log(f"{len(names)} files, {len(fortunes)} fortunes, {sum(map(len, fortunes))} bytes; "
        f"held-out {len(held)} fortunes / {sum(map(len, held))} bytes (sha256 {hashlib.sha256(blob).hexdigest()}); "
        f"validation {len(val)}; train {len(train)} fortunes / {sum(map(len, train))} bytes")


# ---------------------------------------------------------------- model helpers

def make_config():
    from transformers import DeepseekV3Config
    return DeepseekV3Config(**MODEL)


def make_model(cfg, attn, experts):
    from transformers import DeepseekV3ForCausalLM
    try:
        return DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=attn, experts_implementation=experts)
    except Exception as e:
        log(f"experts_implementation={experts} refused ({type(e).__name__}: {e}); default experts")
        return DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=attn)


def load_model(d, device):
    import torch
    from transformers import DeepseekV3ForCausalLM
    try:
        m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
    except Exception as e:
        log(f"from_pretrained with eager experts failed ({type(e).__name__}: {e}); retrying without")
        m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    # check that every checkpoint tensor arrived where it belongs; if not, load them ourselves
    from safetensors.torch import load_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_golden import to_canonical, load_canonical
    want = {k: v.float() for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    got = to_canonical(m, m.config)
    bad = sorted(set(want) ^ set(got)) + [k for k in want if k in got and not torch.equal(want[k], got[k].float())]
    if bad:
        log(f"from_pretrained did not load {len(bad)} tensors as stored (e.g. {bad[:3]}); loading them directly")
        load_canonical(m, want, m.config)
    else:
        log("from_pretrained loaded every stored tensor unchanged")
    return m.to(device).eval()


def gates(model):
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "e_score_correction_bias")]


def route_counts(cfg, mod, h):
    """Expert choice counts for hidden states h under the noaux_tc router (for bias balancing)."""
    import torch
    with torch.no_grad():
        logits = torch.nn.functional.linear(h.reshape(-1, cfg.hidden_size).float(), mod.weight.float())
        c = logits.sigmoid() + mod.e_score_correction_bias.float()
        T, E = c.shape
        G = cfg.n_group
        gs = c.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(T, G, dtype=torch.bool, device=c.device)
        keep.scatter_(1, gs.topk(cfg.topk_group, dim=-1).indices, True)
        c = c.masked_fill(~keep.repeat_interleave(E // G, 1), -math.inf)
        idx = c.topk(cfg.num_experts_per_tok, dim=-1).indices
        return torch.bincount(idx.flatten(), minlength=E)


def fortune_bits(model, fortunes, device, batch=32, autocast=False):
    """Sum of -log2 p(byte) over every byte of every fortune (context BOS + preceding bytes), and byte count."""
    import torch
    total_bits, total_bytes, per = 0.0, 0, []
    for s in range(0, len(fortunes), batch):
        chunk = fortunes[s:s + batch]
        T = max(len(f) for f in chunk) + 1
        ids = torch.full((len(chunk), T), EOS, dtype=torch.long)
        mask = torch.zeros((len(chunk), T - 1), dtype=torch.bool)
        for j, f in enumerate(chunk):
            ids[j, 0] = BOS
            ids[j, 1:1 + len(f)] = torch.tensor(list(f), dtype=torch.long)
            mask[j, :len(f)] = True
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        nll = -(lp * mask) / math.log(2)
        per.extend(nll.sum(1).tolist())
        total_bits += float(nll.sum())
        total_bytes += int(mask.sum())
    return total_bits, total_bytes, per


def save_checkpoint(model, cfg, out):
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_golden import to_canonical
    os.makedirs(out, exist_ok=True)
    canon = to_canonical(model, cfg)
    store = {k: (v.float() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous().cpu()
             for k, v in canon.items()}
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(out)
    p = os.path.join(out, "config.json")
    with open(p) as f:
        cj = json.load(f)
    cj["dtype"] = "bfloat16"
    with open(p, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(store, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    n = sum(v.numel() for v in store.values())
    size = sum(os.path.getsize(os.path.join(out, x)) for x in ("config.json", "model.safetensors"))
    log(f"saved {out}: {len(store)} tensors, {n} parameters, {size} bytes")
    if size > 8_000_000:
        sys.exit(f"train_fortunes: checkpoint is {size} bytes, over the 8 MB budget")
    return n, size


def evaluate(model_dir, heldout_path, device, out_json=None, n_samples=3, extra=None):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with open(heldout_path, "rb") as f:
        held = parse_fortunes(f.read())
    model = load_model(model_dir, device)
    bits, nbytes, per = fortune_bits(model, held, device, batch=1)
    bpb = bits / nbytes
    log(f"held-out: {len(held)} fortunes, {nbytes} bytes, {bits:.3f} bits, bpb {bpb:.6f} (fp32, one fortune a pass)")
    samples = []
    for seed in range(1, n_samples + 1):
        torch.manual_seed(seed)
        ids = torch.tensor([[BOS]], device=device)
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8,
                           top_k=0, top_p=1.0, max_new_tokens=300, eos_token_id=EOS, pad_token_id=EOS)
        toks = g[0, 1:].tolist()
        text = bytes(t for t in toks if t < 256).decode("utf-8", errors="replace")
        samples.append(dict(seed=seed, ids=toks, text=text))
        log(f"--- sample {seed} ({len(toks)} tokens{', ended by EOS' if toks and toks[-1] == EOS else ''}):\n{text}")
    greedy = []
    for prompt in (b"The ", b"Q:"):
        ids = torch.tensor([[BOS] + list(prompt)], device=device)
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                           eos_token_id=EOS, pad_token_id=EOS)
        new = g[0, ids.shape[1]:].tolist()
        greedy.append(dict(prompt_ids=ids[0].tolist(), greedy_ids=new,
                           text=(prompt + bytes(t for t in new if t < 256)).decode("utf-8", errors="replace")))
        log(f"greedy {prompt!r}: {greedy[-1]['text']!r}")
    res = dict(heldout_bpb=bpb, heldout_bits=bits, heldout_bytes=nbytes, heldout_fortunes=len(held),
               heldout_sha256=hashlib.sha256(fortunes_file_bytes(held)).hexdigest(),
               convention=("each fortune of heldout.txt (split on lines holding only '%'; a fortune is its lines, "
                           "each ending in '\\n') is fed alone as [BOS=256] + bytes (<= 512 tokens); every byte "
                           "is predicted from BOS and the bytes before it, BOS and EOS are not predicted; "
                           "bpb = sum(-log2 p(byte)) / number of bytes; float32 weights (bf16 checkpoint upcast) "
                           "and float32 math, eager attention, PyTorch on the GPU with TF32 off"),
               first_fortune_bits=per[:5], samples=samples, greedy=greedy)
    if extra:
        res.update(extra)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return res


# ---------------------------------------------------------------- training

def cmd_train(args):
    import numpy as np
    import torch
    torch.manual_seed(args.seed)
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    names, fortunes = read_corpus(args.corpus)
    held, val, train = split(fortunes)
    log(f"corpus: {len(fortunes)} fortunes; train {len(train)} ({sum(map(len, train))} bytes), val {len(val)}, "
        f"held-out {len(held)} (sha256 {hashlib.sha256(fortunes_file_bytes(held)).hexdigest()})")
    stream = []
    for f in train:
        stream.append(BOS)
        stream.extend(f)
        stream.append(EOS)
    data = torch.tensor(np.array(stream, dtype=np.int64), device=dev)
    N = data.numel()
    cfg = make_config()
    model = make_model(cfg, "sdpa", args.experts_impl).to(dev).train()
    log(f"experts impl: {getattr(model.config, '_experts_implementation', '?')}; "
        f"params {sum(p.numel() for p in model.parameters())}")
    gl = gates(model)
    counts = {n: torch.zeros(cfg.n_routed_experts, device=dev, dtype=torch.long) for n, _ in gl}
    def counter(name):
        def hook(mod, a, o):
            counts[name].add_(route_counts(cfg, mod, a[0]))  # returns None: the output is left alone
        return hook
    hooks = [m.register_forward_hook(counter(n)) for n, m in gl]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=nodecay, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    B, T = args.batch, args.ctx
    g = torch.Generator(device=dev).manual_seed(args.seed)
    t0 = time.time()
    step, hist, acc, accn = 0, [], 0.0, 0
    best = (math.inf, None, 0)
    val_every = args.val_every
    while True:
        el = time.time() - t0
        p = min(el / args.seconds, 1.0)
        if p >= 1.0:
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        starts = torch.randint(0, N - T - 1, (B,), device=dev, generator=g)
        idx = starts[:, None] + torch.arange(T + 1, device=dev)[None]
        chunk = data[idx]
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing of the routers' correction bias, kept >= 0
            for n, m in gl:
                c = counts[n].float()
                m.e_score_correction_bias.add_(args.bias_rate * torch.sign(c.mean() - c))
                m.e_score_correction_bias.sub_(m.e_score_correction_bias.min())
                counts[n].zero_()
        step += 1
        acc += float(loss.detach()) if step % 10 == 0 else 0.0
        accn += 1 if step % 10 == 0 else 0
        if step % val_every == 0 or step == 1:
            model.eval()
            vb, vn, _ = fortune_bits(model, val, dev, batch=64, autocast=True)
            model.train()
            for c in counts.values():
                c.zero_()
            vbpb = vb / vn
            tr = acc / max(accn, 1) / math.log(2)
            acc, accn = 0.0, 0
            el = time.time() - t0
            bias = torch.stack([m.e_score_correction_bias for _, m in gl])
            hist.append(dict(step=step, seconds=round(el, 1), train_bits_per_token=round(tr, 4),
                             val_bpb=round(vbpb, 4), lr=lr))
            log(f"step {step:6d} {el:6.1f}s lr {lr:.2e} train {tr:.4f} bits/token  val {vbpb:.4f} bpb  "
                f"{step * B * T / max(el, 1e-9) / 1e3:.0f}k tok/s  bias max {float(bias.max()):.3f}")
            if vbpb < best[0]:
                best = (vbpb, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
    for h in hooks:
        h.remove()
    log(f"trained {step} steps, {step * B * T} tokens in {time.time() - t0:.1f}s; best val {best[0]:.4f} at step "
        f"{best[2]}")
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    n, size = save_checkpoint(model, cfg, args.out)
    heldout = os.path.join(args.out, "heldout.txt")
    with open(heldout, "wb") as f:
        f.write(fortunes_file_bytes(held))
    extra = dict(train=dict(command=" ".join(sys.argv), seconds=args.seconds, steps=step, batch=B, ctx=T,
                            tokens=step * B * T, lr=args.lr, best_step=best[2], best_val_bpb=best[0],
                            params=n, checkpoint_bytes=size, history=hist))
    if args.skip_eval:
        return
    evaluate(args.out, heldout, dev, os.path.join(args.out, "reference_bpb.json"), args.samples, extra)


def cmd_eval(args):
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = evaluate(args.model, args.heldout, dev, args.json, args.samples)
    log(json.dumps({k: r[k] for k in ("heldout_bpb", "heldout_bits", "heldout_bytes")}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write the held-out fortunes (no torch needed)")
    s.add_argument("--corpus", required=True)
    s.add_argument("--heldout", required=True)
    t = sub.add_parser("train", help="train, save, evaluate")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seconds", type=float, default=330)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--ctx", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--bias-rate", type=float, default=1e-3)
    t.add_argument("--val-every", type=int, default=250)
    t.add_argument("--experts-impl", default="eager")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--samples", type=int, default=3)
    t.add_argument("--skip-eval", action="store_true")
    e = sub.add_parser("eval", help="held-out bpb + samples of a saved model")
    e.add_argument("--model", required=True)
    e.add_argument("--heldout", required=True)
    e.add_argument("--json", default=None)
    e.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    {"split": cmd_split, "train": cmd_train, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()
