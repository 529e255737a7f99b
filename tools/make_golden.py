#!/usr/bin/env python3
"""Builds Petrel's golden reference fixtures from seeded random-weight Hugging Face DeepseekV3ForCausalLM models.

Each fixture directory gets:
  config.json        the config Hugging Face writes for the model (plus quantization_config for the fp8 fixture)
  model.safetensors  the weights under the canonical DeepSeek/HF checkpoint names (one tensor per expert projection)
  golden.json        {"input_ids", "greedy_ids", "prompt_len", "vocab_size", ...diagnostics}
  logits.bin         float32 little-endian, row-major [prompt_len, vocab_size]: the prompt's logits

Reference numbers are computed on the CPU in float32 with eager attention and the eager experts loop.
Needs torch + transformers (run on the device machine: PyTorch 2.11, transformers 5.17).

  python3 tools/make_golden.py --out tests/data/golden [--only tiny_fp32,yarn,fp8]
"""
import argparse
import json
import math
import os
import struct
import sys

# Tensors DeepSeek stores in fp8 (e4m3, 128x128 block scales): every attention and MLP projection.
FP8_SUFFIXES = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
    n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
    hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
    bos_token_id=0, eos_token_id=None, pad_token_id=None, rope_interleave=True,
)

FIXTURES = {
    "tiny_fp32": dict(config=dict(), std=0.1, prompt_len=24, seed=1000, fp8=False,
                      note="tiny fp32 model, default RoPE"),
    "yarn": dict(config=dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                           "mscale_all_dim": 1.0}),
                 std=0.1, prompt_len=100, seed=2000, fp8=False,
                 note="tiny fp32 model with YaRN (factor 4 over 64 original positions), prompt past 64"),
    "fp8": dict(config=dict(vocab_size=384, hidden_size=320, intermediate_size=320, moe_intermediate_size=160,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            q_lora_rank=192, kv_lora_rank=160, qk_rope_head_dim=32, qk_nope_head_dim=64,
                            v_head_dim=64, max_position_embeddings=512),
                std=0.05, prompt_len=264, seed=3000, fp8=True,
                note="DeepSeek fp8 block-scaled checkpoint (e4m3 + 128x128 weight_scale_inv, partial blocks); "
                     "other tensors bf16, e_score_correction_bias fp32; reference = dequantised weights in fp32"),
}

N_NEW = 16
MIN_LOGIT_MARGIN = 1e-3
MIN_ROUTER_MARGIN = 2e-5


def log(*a):
    print(*a, flush=True)


def build_config(extra):
    from transformers import DeepseekV3Config
    kw = dict(BASE)
    kw.update(extra)
    return DeepseekV3Config(**kw)


def new_model(config):
    import torch
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(0)
    for kw in (dict(attn_implementation="eager", experts_implementation="eager"), dict(attn_implementation="eager")):
        try:
            m = DeepseekV3ForCausalLM._from_config(config, **kw)
            break
        except Exception as e:  # older transformers: no experts_implementation
            log(f"_from_config({kw}) failed: {type(e).__name__}: {e}")
            if "experts_implementation" not in kw:
                raise
    m = m.float().eval()
    return m


def expert_layout(model, key, shape, cfg):
    """Returns 'normal' ([E, 2I, H] / [E, H, I]) or 'transposed' for a fused expert tensor."""
    mod = model.get_submodule(key.rsplit(".", 1)[0])
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    want = ((2 * I, H), (H, 2 * I)) if key.endswith("gate_up_proj") else ((H, I), (I, H))
    lay = "transposed" if getattr(mod, "is_transposed", False) else "normal"
    if tuple(shape[1:]) != want[0 if lay == "normal" else 1]:
        raise RuntimeError(f"unexpected fused expert tensor {key} of shape {tuple(shape)} ({lay})")
    return lay


def to_canonical(model, cfg):
    """Model state dict -> dict under checkpoint names (one [out, in] tensor per expert projection)."""
    out = {}
    I = cfg.moe_intermediate_size
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            lay = expert_layout(model, k, v.shape, cfg)
            for e in range(v.shape[0]):
                w = v[e] if lay == "normal" else v[e].t()
                out[f"{pre}{e}.gate_proj.weight"] = w[:I].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = w[I:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            lay = expert_layout(model, k, v.shape, cfg)
            for e in range(v.shape[0]):
                w = v[e] if lay == "normal" else v[e].t()
                out[f"{pre}{e}.down_proj.weight"] = w.contiguous()
        else:
            out[k] = v
    return out


def load_canonical(model, canon, cfg):
    import torch
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            lay = expert_layout(model, k, v.shape, cfg)
            ws = [torch.cat([canon[f"{pre}{e}.gate_proj.weight"], canon[f"{pre}{e}.up_proj.weight"]], 0)
                  for e in range(v.shape[0])]
            new[k] = torch.stack([w if lay == "normal" else w.t() for w in ws]).to(v.dtype)
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            lay = expert_layout(model, k, v.shape, cfg)
            ws = [canon[f"{pre}{e}.down_proj.weight"] for e in range(v.shape[0])]
            new[k] = torch.stack([w if lay == "normal" else w.t() for w in ws]).to(v.dtype)
        else:
            new[k] = canon[k].to(v.dtype)
    model.load_state_dict(new, strict=True)


def randomise(model, seed, std):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # non-negative: HF masks dropped groups with 0.0, DeepSeek with -inf; with c > 0 both agree
                b.copy_(0.2 * torch.rand(b.shape, generator=g))


def quant_fp8_block(w):
    """w [out, in] fp32 -> (e4m3 [out, in], scale_inv fp32 [ceil(out/128), ceil(in/128)])."""
    import torch
    out_f, in_f = w.shape
    bo, bi = (out_f + 127) // 128, (in_f + 127) // 128
    wp = torch.zeros(bo * 128, bi * 128, dtype=torch.float32)
    wp[:out_f, :in_f] = w.float()
    blocks = wp.view(bo, 128, bi, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    q = q.view(bo * 128, bi * 128)[:out_f, :in_f].contiguous()
    return q, scale.contiguous()


def dequant_fp8_block(q, scale):
    import torch
    out_f, in_f = q.shape
    s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out_f, :in_f]
    return q.to(torch.float32) * s


def is_fp8_name(name):
    return name.endswith(FP8_SUFFIXES) and ".mlp.gate." not in name


def make_store(canon, fp8):
    """Returns (tensors to save, dequantised fp32 dict the reference runs on)."""
    import torch
    store, ref = {}, {}
    for k, v in canon.items():
        if not fp8:
            store[k] = v.float().contiguous()
            ref[k] = store[k]
        elif is_fp8_name(k):
            q, s = quant_fp8_block(v)
            store[k] = q
            store[k + "_scale_inv"] = s
            ref[k] = dequant_fp8_block(q, s)
        elif k.endswith("e_score_correction_bias"):
            store[k] = v.float().contiguous()
            ref[k] = store[k]
        else:
            store[k] = v.to(torch.bfloat16).contiguous()
            ref[k] = store[k].float()
    return store, ref


class RouterProbe:
    """Forward hooks on every router: min margins of group choice and expert choice (fp32, as in HF)."""

    def __init__(self, model, cfg):
        import torch
        self.cfg = cfg
        self.group_margin = math.inf
        self.expert_margin = math.inf
        self.counts = {}
        self.handles = []
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(mod, "e_score_correction_bias"):
                self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        import torch

        def fn(mod, args, output):
            cfg = self.cfg
            h = args[0].reshape(-1, cfg.hidden_size).float()
            logits = torch.nn.functional.linear(h, mod.weight.float())
            c = logits.sigmoid() + mod.e_score_correction_bias.float()
            T, E = c.shape
            G, tg, k = cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
            gs = c.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
            sg = gs.sort(dim=-1, descending=True).values
            if tg < G:
                self.group_margin = min(self.group_margin, float((sg[:, tg - 1] - sg[:, tg]).min()))
            keep = torch.zeros(T, G, dtype=torch.bool)
            keep.scatter_(1, gs.topk(tg, dim=-1).indices, True)
            cm = c.masked_fill(~keep.repeat_interleave(E // G, 1), -math.inf)
            sc = cm.sort(dim=-1, descending=True).values
            if k < tg * (E // G):
                self.expert_margin = min(self.expert_margin, float((sc[:, k - 1] - sc[:, k]).min()))
            idx = cm.topk(k, dim=-1).indices
            cnt = torch.bincount(idx.flatten(), minlength=E)
            self.counts[name] = (self.counts.get(name, torch.zeros(E, dtype=torch.long)) + cnt)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def run_reference(model, cfg, input_ids):
    """Returns prompt logits [L, V], greedy ids (HF generate), diagnostics."""
    import torch
    L = input_ids.shape[1]
    with torch.no_grad():
        prompt_logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        gc = model.generation_config
        gc.eos_token_id = None
        gc.pad_token_id = 0
        gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=N_NEW, min_new_tokens=0, num_beams=1, generation_config=gc)
        greedy = gen[0, L:].tolist()
        # the same greedy ids without a KV cache, one full forward per step
        ids = input_ids.clone()
        manual = []
        for _ in range(N_NEW):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        probe = RouterProbe(model, cfg)
        full = torch.cat([input_ids, torch.tensor([greedy[:-1]])], 1)
        full_logits = model(input_ids=full, use_cache=False).logits[0].float()
        probe.close()
    top2 = full_logits[L - 1:].topk(2, dim=-1).values
    diag = dict(
        greedy_matches_no_cache=(greedy == manual),
        min_logit_margin=float((top2[:, 0] - top2[:, 1]).min()),
        min_router_group_margin=probe.group_margin,
        min_router_expert_margin=probe.expert_margin,
        expert_counts={k: v.tolist() for k, v in probe.counts.items()},
        prompt_logits_absmax=float(prompt_logits.abs().max()),
        prompt_logits_std=float(prompt_logits.std()),
        prompt_vs_full_max_diff=float((full_logits[:L] - prompt_logits).abs().max()),
    )
    return prompt_logits, greedy, manual, diag


def acceptable(greedy, manual, diag):
    reasons = []
    if greedy != manual:
        reasons.append("generate != no-cache greedy")
    if len(set(greedy)) < 4:
        reasons.append("greedy ids degenerate")
    if diag["min_logit_margin"] < MIN_LOGIT_MARGIN:
        reasons.append(f"logit margin {diag['min_logit_margin']:.2e}")
    for k in ("min_router_group_margin", "min_router_expert_margin"):
        if diag[k] < MIN_ROUTER_MARGIN:
            reasons.append(f"{k} {diag[k]:.2e}")
    return reasons


def write_fixture(outdir, name, spec, cfg, model, store, input_ids, logits, greedy, diag, seed):
    import torch
    from safetensors.torch import save_file
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(d)
    cpath = os.path.join(d, "config.json")
    with open(cpath) as f:
        cj = json.load(f)
    # the tensors that are not fp8 are stored in bf16, as DeepSeek does
    cj["dtype"] = "bfloat16" if spec["fp8"] else "float32"
    if spec["fp8"]:
        cj["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    with open(cpath, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(store, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    L, V = logits.shape
    with open(os.path.join(d, "logits.bin"), "wb") as f:
        f.write(logits.contiguous().numpy().astype("<f4").tobytes())
    diag = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in diag.items()}
    golden = dict(input_ids=input_ids[0].tolist(), greedy_ids=greedy, prompt_len=L, vocab_size=V,
                  seed=seed, init_std=spec["std"], description=spec["note"],
                  reference="transformers DeepseekV3ForCausalLM, CPU, float32, eager attention, eager experts",
                  **{k: v for k, v in diag.items()})
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    sizes = {fn: os.path.getsize(os.path.join(d, fn)) for fn in sorted(os.listdir(d))}
    log(f"[{name}] wrote {d}: {sizes} total {sum(sizes.values())} bytes")


def reload_check(d, logits, input_ids):
    """Loads the written checkpoint with from_pretrained and compares prompt logits (fp32 fixtures only)."""
    import torch
    from transformers import DeepseekV3ForCausalLM
    try:
        try:
            m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                      experts_implementation="eager")
        except Exception:
            m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        m.eval()
        with torch.no_grad():
            l2 = m(input_ids=input_ids, use_cache=False).logits[0].float()
        return float((l2 - logits).abs().max())
    except Exception as e:  # report, do not hide
        log(f"  reload_check failed: {type(e).__name__}: {e}")
        return None


def hf_probe(model, cfg):
    """Prints what save_pretrained writes for this transformers version (names, config keys)."""
    import tempfile
    from safetensors import safe_open
    with tempfile.TemporaryDirectory() as t:
        model.save_pretrained(t)
        files = sorted(os.listdir(t))
        log("[probe] save_pretrained wrote:", files)
        for fn in files:
            if fn.endswith(".safetensors"):
                with safe_open(os.path.join(t, fn), "pt") as f:
                    keys = sorted(f.keys())
                    log(f"[probe] {len(keys)} tensors; layer-1 keys:",
                        [k for k in keys if ".layers.1." in k][:40])
                    log("[probe] dtypes:", sorted({str(f.get_tensor(k).dtype) for k in keys}))
        with open(os.path.join(t, "config.json")) as f:
            log("[probe] config.json:", f.read())

# ---------------------------------------------------------------- independent numpy check (no torch)
# A second implementation of the forward pass, written from the semantics in shared/DESIGN.md, in float64.
# `--verify DIR` runs it on every fixture and compares with logits.bin and greedy_ids.

def _np():
    import numpy as np
    return np


def read_safetensors(path):
    np = _np()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        blob = f.read()
    e4m3 = np.zeros(256, dtype=np.float64)
    for b in range(256):
        sgn, ex, m = b >> 7, (b >> 3) & 15, b & 7
        if ex == 15 and m == 7:
            v = math.nan
        elif ex == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1 + m / 8.0) * 2.0 ** (ex - 7)
        e4m3[b] = -v if sgn else v
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = blob[a:b]
        dt = meta["dtype"]
        if dt == "F32":
            t = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dt == "BF16":
            t = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F8_E4M3":
            t = e4m3[np.frombuffer(raw, dtype=np.uint8)].astype(np.float32)
        else:
            raise ValueError(f"{path}: tensor {k} has unsupported dtype {dt}")
        out[k] = t.reshape(meta["shape"])
    return out


def np_weights(d):
    """Checkpoint tensors as float64, fp8 ones dequantised (fp32 product, as the reference does)."""
    np = _np()
    raw = read_safetensors(os.path.join(d, "model.safetensors"))
    w = {}
    for k, v in raw.items():
        if k.endswith("_scale_inv"):
            continue
        si = raw.get(k + "_scale_inv")
        if si is not None:
            s = np.repeat(np.repeat(si, 128, 0), 128, 1)[: v.shape[0], : v.shape[1]]
            v = (v.astype(np.float32) * s.astype(np.float32)).astype(np.float32)
        w[k] = v.astype(np.float64)
    return w


def np_rope(cfg, T):
    """cos, sin [T, rope_dim/2] for adjacent-pair (interleaved) rotation, and the softmax scale."""
    np = _np()
    d = cfg["qk_rope_head_dim"]
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    base = theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    inv = 1.0 / base
    scale = (cfg["qk_nope_head_dim"] + d) ** -0.5
    att = 1.0
    if kind == "yarn":
        f = rp["factor"]
        orig = rp["original_max_position_embeddings"]
        bf, bs = rp.get("beta_fast", 32.0), rp.get("beta_slow", 1.0)

        def dim_of(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = max(math.floor(dim_of(bf)), 0), min(math.ceil(dim_of(bs)), d - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        keep = 1.0 - ramp  # 1: extrapolate (original frequency), 0: interpolate (frequency / factor)
        inv = (1.0 / (f * base)) * (1 - keep) + inv * keep

        def ms(sc, m):
            return 1.0 if sc <= 1 else 0.1 * m * math.log(sc) + 1.0
        att = ms(f, rp.get("mscale", 1.0)) / ms(f, rp.get("mscale_all_dim", 0.0))
        if rp.get("mscale_all_dim"):
            scale *= ms(f, rp["mscale_all_dim"]) ** 2
    elif kind != "default":
        raise ValueError(f"rope type {kind} not handled by the numpy check")
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang) * att, np.sin(ang) * att, scale


def np_forward(cfg, w, ids):
    np = _np()
    T = len(ids)
    eps = cfg["rms_norm_eps"]
    H, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    R = cfg["kv_lora_rank"]
    cos, sin, scale = np_rope(cfg, T)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def lin(x, name):
        return x @ w[name].T

    def rot(x):  # x [..., T, dr]: rotate adjacent pairs (2j, 2j+1) by angle pos * inv[j]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
        return out

    def mlp(x, pre):
        g, u = lin(x, pre + "gate_proj.weight"), lin(x, pre + "up_proj.weight")
        return lin(g / (1 + np.exp(-g)) * u, pre + "down_proj.weight")

    h = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        a = p + "self_attn."
        if cfg.get("q_lora_rank"):
            q = lin(rms(lin(x, a + "q_a_proj.weight"), w[a + "q_a_layernorm.weight"]), a + "q_b_proj.weight")
        else:
            q = lin(x, a + "q_proj.weight")
        q = q.reshape(T, H, dn + dr).transpose(1, 0, 2)
        ckv = lin(x, a + "kv_a_proj_with_mqa.weight")
        kv = lin(rms(ckv[:, :R], w[a + "kv_a_layernorm.weight"]), a + "kv_b_proj.weight")
        kv = kv.reshape(T, H, dn + dv).transpose(1, 0, 2)
        qpe, kpe = rot(q[..., dn:]), rot(ckv[:, R:])
        sc = (q[..., :dn] @ kv[..., :dn].transpose(0, 2, 1) + qpe @ kpe.T) * scale + causal
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = (sc @ kv[..., dn:]).transpose(1, 0, 2).reshape(T, H * dv)
        h = h + lin(o, a + "o_proj.weight")
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            h = h + mlp(x, m)
            continue
        E, G, tg, k = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
        s = 1 / (1 + np.exp(-(x @ w[m + "gate.weight"].T)))
        c = s + w[m + "gate.e_score_correction_bias"]
        gs = np.sort(c.reshape(T, G, E // G), -1)[..., -2:].sum(-1)
        y = mlp(x, m + "shared_experts.")
        for t in range(T):
            groups = np.argsort(-gs[t], kind="stable")[:tg]
            ct = np.full(E, -np.inf)
            for g in groups:
                ct[g * (E // G):(g + 1) * (E // G)] = c[t, g * (E // G):(g + 1) * (E // G)]
            sel = np.argsort(-ct, kind="stable")[:k]
            wt = s[t, sel]
            if cfg.get("norm_topk_prob", True):
                wt = wt / (wt.sum() + 1e-20)
            wt = wt * cfg["routed_scaling_factor"]
            for e, we in zip(sel, wt):
                y[t] += we * mlp(x[t:t + 1], f"{m}experts.{e}.")[0]
        h = h + y
    h = rms(h, w["model.norm.weight"])
    return h @ w["lm_head.weight"].T


def verify(root):
    np = _np()
    ok = True
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, "golden.json")):
            continue
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "golden.json")) as f:
            g = json.load(f)
        L, V = g["prompt_len"], g["vocab_size"]
        ref = np.fromfile(os.path.join(d, "logits.bin"), dtype="<f4").reshape(L, V)
        w = np_weights(d)
        full = g["input_ids"] + g["greedy_ids"][:-1]
        lg = np_forward(cfg, w, np.array(full))
        diff = float(np.abs(lg[:L] - ref).max())
        greedy = [int(v) for v in lg[L - 1:].argmax(-1)]
        good = diff < 1e-3 and greedy == g["greedy_ids"]
        ok &= good
        log(f"[verify {name}] numpy float64 vs HF float32: max |dlogit| {diff:.3e} (max |logit| "
            f"{float(np.abs(ref).max()):.3f}); greedy {'matches' if greedy == g['greedy_ids'] else 'DIFFERS'} "
            f"-> {'OK' if good else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (one sub-directory per fixture)")
    ap.add_argument("--verify", metavar="DIR", help="check DIR's fixtures with the numpy implementation (no torch)")
    ap.add_argument("--only", default=",".join(FIXTURES), help="comma-separated fixture names")
    ap.add_argument("--probe", action="store_true", help="print what save_pretrained writes")
    ap.add_argument("--tries", type=int, default=40, help="seeds to try per fixture")
    args = ap.parse_args()
    if args.verify:
        sys.exit(0 if verify(args.verify) else 1)
    if not args.out:
        sys.exit("make_golden: --out DIR (or --verify DIR) is required")

    import torch
    import transformers
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"torch {torch.__version__} transformers {transformers.__version__}")
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in FIXTURES:
            sys.exit(f"make_golden: unknown fixture '{n}' (known: {', '.join(FIXTURES)})")
    for name in names:
        spec = FIXTURES[name]
        cfg = build_config(spec["config"])
        log(f"[{name}] rope_parameters={getattr(cfg, 'rope_parameters', None)} "
            f"rope_scaling={getattr(cfg, 'rope_scaling', None)}")
        model = new_model(cfg)
        log(f"[{name}] experts impl={getattr(cfg, '_experts_implementation', '?')} "
            f"attn impl={getattr(cfg, '_attn_implementation', '?')}")
        if args.probe and name == names[0]:
            hf_probe(model, cfg)
        chosen = None
        for t in range(args.tries):
            seed = spec["seed"] + t
            randomise(model, seed, spec["std"])
            canon = to_canonical(model, cfg)
            store, ref = make_store(canon, spec["fp8"])
            load_canonical(model, ref, cfg)
            g = torch.Generator().manual_seed(seed + 7)
            input_ids = torch.randint(0, cfg.vocab_size, (1, spec["prompt_len"]), generator=g)
            logits, greedy, manual, diag = run_reference(model, cfg, input_ids)
            bad = acceptable(greedy, manual, diag)
            log(f"[{name}] seed {seed}: greedy={greedy} margins logit={diag['min_logit_margin']:.3e} "
                f"group={diag['min_router_group_margin']:.3e} expert={diag['min_router_expert_margin']:.3e} "
                f"{'OK' if not bad else 'rejected: ' + '; '.join(bad)}")
            if not bad:
                chosen = (seed, store, input_ids, logits, greedy, diag)
                break
        if chosen is None:
            sys.exit(f"make_golden: no acceptable seed for {name} in {args.tries} tries")
        seed, store, input_ids, logits, greedy, diag = chosen
        if not spec["fp8"]:
            # write first, then check the written files load back through HF's own loader
            write_fixture(args.out, name, spec, cfg, model, store, input_ids, logits, greedy, diag, seed)
            diff = reload_check(os.path.join(args.out, name), logits, input_ids)
            log(f"[{name}] from_pretrained reload max |dlogit| = {diff}")
            diag["from_pretrained_reload_max_diff"] = diff
        write_fixture(args.out, name, spec, cfg, model, store, input_ids, logits, greedy, diag, seed)
        log(f"[{name}] diag: " + json.dumps({k: v for k, v in diag.items() if k != 'expert_counts'}))
        log(f"[{name}] expert counts: {diag['expert_counts']}")


if __name__ == "__main__":
    main()
