#!/usr/bin/env python3
"""make_fixtures.py: builds tiny random-weight MoE checkpoints plus transformers reference logits.

What it is: the generator of tests/fixtures/ (7 checkpoints in the layouts moeflux must read:
HF safetensors per-expert / fused / sharded VL, and MLX affine 4-bit / 8-bit), each with
float32 reference logits and a greedy continuation computed by Hugging Face transformers.
What it is not: part of the C build. It needs torch + transformers 5.x (the GPU machine) and
runs on the CPU there in float32, deterministic from --seed.

    python3 tools/make_fixtures.py --out tests/fixtures --seed 1
"""
import argparse
import copy
import glob
import json
import os
import shutil
import struct
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

H = 64          # hidden_size
V = 512         # vocab_size
L = 4           # layers
E = 8           # experts
K = 2           # experts per token
I = 64          # moe_intermediate_size
GS = 64         # quantization group size
T_PROMPT = 12
N_GREEDY = 8
MARGIN_MIN = 1e-3
LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]

# ----------------------------------------------------------------------------- configs


def rope_params(partial):
    p = {"rope_type": "default", "rope_theta": 10000.0}
    if partial:
        p["partial_rotary_factor"] = 0.25
    return p


def text_common():
    return dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, num_experts=E,
                num_experts_per_tok=K, moe_intermediate_size=I, max_position_embeddings=4096,
                tie_word_embeddings=False, hidden_act="silu", attention_bias=False)


def linear_common():
    return dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                linear_value_head_dim=32, linear_conv_kernel_dim=4,
                shared_expert_intermediate_size=64, layer_types=list(LAYER_TYPES))


def make_config(cls, kw, optional=()):
    """Builds a config; keys in `optional` are dropped one by one if the class rejects them."""
    kw = dict(kw)
    for _ in range(len(optional) + 1):
        try:
            cfg = cls(**kw)
            for k in optional:
                if k in kw and getattr(cfg, k, None) is None:
                    setattr(cfg, k, kw[k])
            return cfg
        except Exception as e:  # strict configs may reject unknown keys
            dropped = False
            for k in optional:
                if k in kw and k in str(e):
                    print(f"  config {cls.__name__}: dropping {k} ({e})")
                    kw.pop(k)
                    dropped = True
                    break
            if not dropped:
                raise
    return cls(**kw)


def cfg_qwen3_5_text():
    kw = text_common()
    kw.update(linear_common())
    rp = rope_params(True)
    rp.update({"mrope_section": [2, 1, 1], "mrope_interleaved": True})
    kw["rope_parameters"] = rp
    kw["norm_topk_prob"] = True
    kw["dtype"] = "bfloat16"
    return make_config(transformers.Qwen3_5MoeTextConfig, kw, optional=("norm_topk_prob",))


def cfg_qwen3_5_vl():
    t = cfg_qwen3_5_text().to_dict()
    for k in ("architectures", "transformers_version"):
        t.pop(k, None)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16, in_channels=3)
    return transformers.Qwen3_5MoeConfig(text_config=t, vision_config=vision,
                                         tie_word_embeddings=False, dtype="bfloat16")


def cfg_qwen3_next():
    kw = text_common()
    kw.update(linear_common())
    kw.update(dict(rope_parameters=rope_params(True), norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=[], intermediate_size=128, dtype="bfloat16"))
    return make_config(transformers.Qwen3NextConfig, kw)


def cfg_qwen3_moe(tied, mlp_only):
    kw = text_common()
    kw.update(dict(rope_parameters=rope_params(False), norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=list(mlp_only), intermediate_size=128,
                   tie_word_embeddings=tied, dtype="bfloat16"))
    return make_config(transformers.Qwen3MoeConfig, kw)


# ----------------------------------------------------------------------------- weights


def bf16r(t):
    return t.to(torch.bfloat16).to(torch.float32)


def one_plus_norm(name, family):
    """True where the RMSNorm multiplies by (1 + w) (qwen3_5_moe / qwen3_next, not the gated norm)."""
    if family == "qwen3_moe":
        return False
    if "visual" in name or name.startswith("mtp."):
        return False
    if ".linear_attn.norm." in name:
        return False
    return name.endswith("layernorm.weight") or name.endswith("norm.weight")


def random_value(name, shape, g, family, tied):
    def randn(std):
        return torch.randn(shape, generator=g) * std

    if name.endswith("A_log"):
        return torch.log(torch.rand(shape, generator=g) * 15.0 + 1.0)
    if name.endswith("dt_bias"):
        return randn(0.3)
    if "conv1d.weight" in name:
        return randn(0.5)
    if "visual" in name:
        if len(shape) == 1:
            return (1.0 + randn(0.1)) if name.endswith("weight") else randn(0.02)
        fan = int(np.prod(shape[1:]))
        return randn(1.0 / np.sqrt(fan))
    if len(shape) == 1:
        if "norm" in name:
            return randn(0.1) if one_plus_norm(name, family) else 1.0 + randn(0.1)
        print(f"  warning: unclassified 1-D tensor {name} {tuple(shape)}: N(0,0.02)")
        return randn(0.02)
    if name.endswith("embed_tokens.weight"):
        return randn(0.15 if tied else 1.0)
    if name.endswith("lm_head.weight"):
        return randn(2.0 / np.sqrt(shape[-1]))
    if name.endswith("mlp.gate.weight"):
        return randn(3.0 / np.sqrt(shape[-1]))
    if len(shape) in (2, 3):
        return randn(1.0 / np.sqrt(shape[-1]))
    print(f"  warning: unclassified tensor {name} {tuple(shape)}: N(0,0.02)")
    return randn(0.02)


def randomize(model, seed, family, tied, round_bf16=True, keep_f32=()):
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    new = {}
    for name in sorted(sd.keys()):
        if sd[name].ndim == 1 and "norm" in name and "visual" not in name:
            init = float(sd[name].float().mean())
            want = 0.0 if one_plus_norm(name, family) else 1.0
            if abs(init - want) > 1e-6:
                print(f"  WARNING: {name} initialised to mean {init}, expected {want} for its norm kind")
        v = random_value(name, tuple(sd[name].shape), g, family, tied).to(torch.float32)
        if round_bf16 and not any(name.endswith(s) for s in keep_f32):
            v = bf16r(v)
        new[name] = v
    if tied and "lm_head.weight" in new:
        emb = [k for k in new if k.endswith("embed_tokens.weight")][0]
        new["lm_head.weight"] = new[emb]
    model.load_state_dict(new, strict=True)
    return new


def force_torch_paths(model):
    """Uses the plain torch gated-delta / conv paths so CPU float32 is the reference."""
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is None:
            continue
        if hasattr(m, "causal_conv1d_fn"):
            m.causal_conv1d_fn = None
        if hasattr(m, "chunk_gated_delta_rule") and hasattr(mod, "torch_chunk_gated_delta_rule"):
            m.chunk_gated_delta_rule = mod.torch_chunk_gated_delta_rule
        if hasattr(m, "recurrent_gated_delta_rule") and hasattr(mod, "torch_recurrent_gated_delta_rule"):
            m.recurrent_gated_delta_rule = mod.torch_recurrent_gated_delta_rule
        if hasattr(m, "causal_conv1d_update") and hasattr(mod, "torch_causal_conv1d_update"):
            m.causal_conv1d_update = mod.torch_causal_conv1d_update


def build_model(cls, config):
    try:
        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    except Exception as e:
        print(f"  _from_config failed ({e}); plain constructor")
        config._attn_implementation = "eager"
        model = cls(config)
    model = model.to(torch.float32).eval()
    for fn in ("set_experts_implementation",):
        if hasattr(model, fn):
            try:
                getattr(model, fn)("eager")
            except Exception as e:
                print(f"  {fn}('eager') failed: {e}")
    force_torch_paths(model)
    return model


# ----------------------------------------------------------------------------- reference


@torch.no_grad()
def logits_of(model, ids):
    out = model(input_ids=torch.tensor([ids], dtype=torch.long))
    return out.logits[0].to(torch.float32)


def margin(row):
    top = torch.topk(row, 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def reference(model, seed, fidx):
    for attempt in range(200):
        rng = np.random.default_rng([seed, fidx, attempt])
        prompt = [int(x) for x in rng.integers(0, V, T_PROMPT)]
        lg = logits_of(model, prompt)
        m_prompt = [margin(lg[t]) for t in range(lg.shape[0])]
        ids = list(prompt)
        greedy, m_greedy = [], []
        for _ in range(N_GREEDY):
            row = logits_of(model, ids)[-1]
            nxt = int(torch.argmax(row))
            m_greedy.append(margin(row))
            greedy.append(nxt)
            ids.append(nxt)
        # the greedy step 0 row is the last prompt row: must agree
        assert torch.equal(logits_of(model, prompt)[-1], lg[-1])
        if min(m_prompt + m_greedy) >= MARGIN_MIN:
            return dict(prompt=prompt, greedy=greedy, logits=lg.numpy().astype(np.float32),
                        min_margin=float(min(m_prompt + m_greedy)),
                        min_margin_greedy=float(min(m_greedy)), attempt=attempt,
                        max_abs_logit=float(lg.abs().max()))
        print(f"  prompt attempt {attempt}: margin {min(m_prompt + m_greedy):.2e} < {MARGIN_MIN}, reseeding")
    raise RuntimeError("no prompt with decisive margins")


# ----------------------------------------------------------------------------- safetensors I/O

ST_DTYPE = {torch.bfloat16: ("BF16", 2), torch.float32: ("F32", 4), torch.float16: ("F16", 2)}


def tensor_entry(v):
    """(dtype string, itemsize, shape, raw little-endian bytes) of a torch tensor or numpy array."""
    if isinstance(v, np.ndarray):
        if v.dtype == np.uint32:
            return "U32", 4, list(v.shape), v.astype("<u4").tobytes()
        if v.dtype == np.float32:
            return "F32", 4, list(v.shape), v.astype("<f4").tobytes()
        raise TypeError(v.dtype)
    v = v.detach().cpu().contiguous()
    name, size = ST_DTYPE[v.dtype]
    if v.dtype == torch.bfloat16:
        raw = v.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        raw = v.numpy().tobytes()
    return name, size, list(v.shape), raw


def write_safetensors(path, tensors, metadata):
    entries = {k: tensor_entry(v) for k, v in tensors.items()}
    order = sorted(entries, key=lambda k: (-entries[k][1], k))  # as the safetensors library does
    header = {"__metadata__": metadata}
    off = 0
    for k in order:
        dt, _, shape, raw = entries[k]
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for k in order:
            f.write(entries[k][3])
    return off


def read_safetensors(path):
    """Own reader (numpy / torch), independent of the writer's bookkeeping."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, h in header.items():
        if k == "__metadata__":
            continue
        a, b = h["data_offsets"]
        raw = data[a:b]
        if h["dtype"] == "BF16":
            t = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16)
            out[k] = t.reshape(h["shape"])
        elif h["dtype"] == "F32":
            out[k] = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).reshape(h["shape"])
        elif h["dtype"] == "U32":
            out[k] = np.frombuffer(raw, dtype="<u4").copy().reshape(h["shape"])
        else:
            raise TypeError(h["dtype"])
    return out


def check_with_library(path):
    """Opens the file with the safetensors library to prove the format is valid."""
    from safetensors import safe_open
    n = 0
    with safe_open(path, framework="numpy") as f:
        for k in f.keys():
            try:
                f.get_tensor(k)
            except Exception:
                pass  # numpy has no bf16; the header parse is what we check
            n += 1
    return n


def hf_saved_keys(model, tmp):
    """What save_pretrained writes for this model (bf16 copy): {key: (dtype, shape)}."""
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.save_pretrained(tmp)
    keys = {}
    from safetensors import safe_open
    for p in sorted(glob.glob(os.path.join(tmp, "*.safetensors"))):
        with safe_open(p, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                keys[k] = (str(t.dtype).replace("torch.", ""), tuple(t.shape), t)
    return keys


def show_keys(title, keys):
    print(f"  {title}: {len(keys)} tensors")
    for k in sorted(keys):
        if ".layers." in k and not any(f".layers.{n}." in k for n in (0, 1, 3)):
            continue
        if ".experts." in k and any(f".experts.{e}." in k for e in range(1, E)):
            continue
        dt, shape = keys[k][0], keys[k][1]
        print(f"    {k:70s} {dt:9s} {list(shape)}")


# ----------------------------------------------------------------------------- layouts


def experts_to_per_expert(sd):
    """In-memory fused experts -> mlp.experts.N.{gate,up,down}_proj.weight (gate = first half)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{p}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def experts_to_fused(sd):
    """Per-expert keys -> fused mlp.experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    out, groups = {}, {}
    for k, v in sd.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            p, rest = k.split(".mlp.experts.")
            e, proj = rest.split(".")[0], rest.split(".")[1]
            groups.setdefault(p, {}).setdefault(proj, {})[int(e)] = v
        else:
            out[k] = v
    for p, d in groups.items():
        n = len(d["gate_proj"])
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([d["gate_proj"][e], d["up_proj"][e]], 0) for e in range(n)])
        out[f"{p}.mlp.experts.down_proj"] = torch.stack([d["down_proj"][e] for e in range(n)])
    return out


def fake_mtp(g):
    def r(*shape, std):
        return bf16r(torch.randn(shape, generator=g) * std).to(torch.bfloat16)
    return {
        "mtp.fc.weight": r(H, 2 * H, std=1 / np.sqrt(2 * H)),
        "mtp.norm.weight": r(H, std=0.1),
        "mtp.pre_fc_norm_embedding.weight": r(H, std=0.1),
        "mtp.pre_fc_norm_hidden.weight": r(H, std=0.1),
        "mtp.layers.0.input_layernorm.weight": r(H, std=0.1),
        "mtp.layers.0.post_attention_layernorm.weight": r(H, std=0.1),
        "mtp.layers.0.self_attn.o_proj.weight": r(H, 128, std=1 / np.sqrt(128)),
        "mtp.layers.0.mlp.gate.weight": r(E, H, std=3 / np.sqrt(H)),
    }


def write_hf(dirn, tensors, shards):
    tensors = {k: (v.to(torch.bfloat16) if v.dtype == torch.float32 else v) for k, v in tensors.items()}
    meta = {"format": "pt"}
    if shards == 1:
        write_safetensors(os.path.join(dirn, "model.safetensors"), tensors, meta)
        return ["model.safetensors"]
    keys = sorted(tensors)
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    total = sum(sizes)
    acc, cut = 0, len(keys)
    for i, s in enumerate(sizes):
        if acc >= total / 2:
            cut = i
            break
        acc += s
    parts = [keys[:cut], keys[cut:]]
    names = [f"model-{i + 1:05d}-of-00002.safetensors" for i in range(2)]
    wmap = {}
    for part, nm in zip(parts, names):
        write_safetensors(os.path.join(dirn, nm), {k: tensors[k] for k in part}, meta)
        for k in part:
            wmap[k] = nm
    with open(os.path.join(dirn, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, f, indent=2)
    return names


def load_dir_tensors(dirn):
    out = {}
    for p in sorted(glob.glob(os.path.join(dirn, "*.safetensors"))):
        check_with_library(p)
        out.update(read_safetensors(p))
    return out


def edit_config(cfg, family):
    """Small edits so config.json reads like a released checkpoint's."""
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = "bfloat16"  # transformers writes the in-memory float32 here
    if family == "qwen3_moe_released" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")  # released Qwen3 MoE configs say num_experts
    return cfg


def copy_configs(tmp, dirn, family):
    with open(os.path.join(tmp, "config.json")) as f:
        cfg = edit_config(json.load(f), family)
    with open(os.path.join(dirn, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    gc = os.path.join(tmp, "generation_config.json")
    if os.path.exists(gc):
        shutil.copy(gc, os.path.join(dirn, "generation_config.json"))
    return cfg


def save_ref(dirn, ref, meta):
    np.save(os.path.join(dirn, "ref_logits.npy"), ref["logits"])
    j = dict(meta)
    j.update(prompt=ref["prompt"], greedy=ref["greedy"], min_margin=ref["min_margin"],
             min_margin_greedy=ref["min_margin_greedy"], max_abs_logit=ref["max_abs_logit"],
             prompt_attempt=ref["attempt"], n_prompt=T_PROMPT, n_greedy=N_GREEDY,
             logits_file="ref_logits.npy", logits_shape=list(ref["logits"].shape),
             reference="transformers %s, torch %s, float32, CPU, full re-forward per greedy step"
             % (transformers.__version__, torch.__version__))
    with open(os.path.join(dirn, "ref.json"), "w") as f:
        json.dump(j, f, indent=2)


def logits_diff(model, ref):
    lg = logits_of(model, ref["prompt"]).numpy()
    return float(np.abs(lg - ref["logits"]).max())


# ----------------------------------------------------------------------------- HF fixtures


def make_hf(out, seed, fidx, name, cls, config, family, layout, extra_mtp=False, shards=1):
    print(f"\n=== {name} ({cls.__name__}, layout {layout})")
    dirn = os.path.join(out, name)
    os.makedirs(dirn, exist_ok=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model = build_model(cls, config)
    sd = randomize(model, seed * 100 + fidx, family, tied)
    ref = reference(model, seed, fidx)
    with tempfile.TemporaryDirectory() as tmp:
        saved = hf_saved_keys(model, tmp)
        show_keys("save_pretrained wrote", saved)
        cfg = copy_configs(tmp, dirn, family + ("_released" if tied else ""))
    print("  config.json: " + json.dumps(cfg, sort_keys=True))
    # the layout we commit
    tensors = {k: v for k, v in sd.items()}
    if tied:
        tensors.pop("lm_head.weight", None)
    if layout.startswith("per_expert"):
        tensors = experts_to_per_expert(tensors)
    if extra_mtp:
        tensors.update(fake_mtp(torch.Generator().manual_seed(seed * 100 + fidx + 50)))
    files = write_hf(dirn, tensors, shards)
    # same keys as save_pretrained where the layouts agree: values must be identical
    same = [k for k in tensors if k in saved]
    bad = [k for k in same if not torch.equal(tensors[k].to(torch.float32), saved[k][2].to(torch.float32))]
    dts = sorted({saved[k][0] for k in saved})
    print(f"  save_pretrained dtypes: {dts}")
    only_mine = sorted(set(tensors) - set(saved))
    only_hf = sorted(set(saved) - set(tensors))
    print(f"  vs save_pretrained: {len(same)} shared keys, {len(bad)} differ; "
          f"only ours {len(only_mine)} (e.g. {only_mine[:3]}), only HF {len(only_hf)} (e.g. {only_hf[:3]})")
    assert not bad, bad[:5]
    # reload 1: transformers from_pretrained on the committed directory
    hf_diff, info = None, None
    try:
        m2, info = cls.from_pretrained(dirn, dtype=torch.float32, attn_implementation="eager",
                                       output_loading_info=True)
        m2 = m2.to(torch.float32).eval()
        force_torch_paths(m2)
        hf_diff = logits_diff(m2, ref)
        info = {k: list(v)[:4] for k, v in info.items() if v}
    except Exception as e:
        print(f"  from_pretrained failed: {e!r}")
        traceback.print_exc()
    print(f"  from_pretrained reload: max|dlogit| {hf_diff}  loading info {info}")
    # reload 2: our own reader, converted back to the in-memory layout
    back = {k: v.to(torch.float32) for k, v in load_dir_tensors(dirn).items() if not k.startswith("mtp.")}
    back = experts_to_fused(back)
    if tied:
        back["lm_head.weight"] = back[[k for k in back if k.endswith("embed_tokens.weight")][0]]
    m3 = build_model(cls, config)
    m3.load_state_dict(back, strict=True)
    own_diff = logits_diff(m3, ref)
    print(f"  own-reader reload: max|dlogit| {own_diff}")
    assert own_diff == 0.0, own_diff
    if hf_diff is not None and hf_diff > 1e-4:
        print(f"  WARNING: from_pretrained logits differ by {hf_diff}")
    meta = dict(fixture=name, model_type=cfg.get("model_type"), architecture=cls.__name__,
                layout=layout, seed=seed, files=files, tie_word_embeddings=tied)
    save_ref(dirn, ref, meta)
    print(f"  max|logit| {ref['max_abs_logit']:.3f}  min margin {ref['min_margin']:.4f}  "
          f"prompt {ref['prompt']}  greedy {ref['greedy']}")
    return dict(name=name, model_type=cfg.get("model_type"), layout=layout,
                max_abs_logit=ref["max_abs_logit"], min_margin=ref["min_margin"],
                hf_reload=hf_diff, own_reload=own_diff, greedy=ref["greedy"])


# ----------------------------------------------------------------------------- MLX fixtures


def pack_bits(q, bits):
    """q [..., in] (integers 0..2^bits-1) -> u32 words [..., in*bits/32]; element j at bits (j % per)*bits."""
    per = 32 // bits
    q = np.asarray(q).astype(np.uint64)
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    words = np.zeros(q.shape[:-1], dtype=np.uint64)
    for j in range(per):
        words |= q[..., j] << np.uint64(j * bits)
    return words.astype(np.uint32)


def mlx_quantize(w, bits):
    """MLX affine quantization of w [..., in] (float32 numpy) -> (u32 words, bf16 scales, bf16 biases).

    Per group of 64 inputs: w ~ scale * q + bias, q in [0, 2^bits - 1]; element j of a row sits at
    bits (j % (32/bits)) * bits of u32 word j / (32/bits), lowest bits first. Scale and bias follow
    mlx/ops.cpp affine_quantize (the 'edge' rule that makes 0 exact; scales may be negative), then
    are rounded to bf16 and q is computed against the rounded values.
    """
    shape = w.shape
    wg = w.reshape(-1, shape[-1] // GS, GS).astype(np.float32)
    n_bins = float((1 << bits) - 1)
    w_max = wg.max(-1, keepdims=True)
    w_min = wg.min(-1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, 1e-7)
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.round(edge / scales)
    scales = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scales)
    biases = np.where(q0 == 0, 0, edge)
    scales_t = torch.from_numpy(scales.astype(np.float32)).to(torch.bfloat16)
    biases_t = torch.from_numpy(biases.astype(np.float32)).to(torch.bfloat16)
    s = scales_t.to(torch.float32).numpy()
    b = biases_t.to(torch.float32).numpy()
    q = np.clip(np.round((wg - b) / s), 0, n_bins).reshape(shape)
    words = pack_bits(q, bits)
    sshape = (*shape[:-1], shape[-1] // GS)
    return words, scales_t.reshape(sshape), biases_t.reshape(sshape)


def mlx_dequantize(words, scales, biases, bits):
    per = 32 // bits
    w = words.astype(np.uint64)
    q = np.stack([(w >> np.uint64(j * bits)) & np.uint64((1 << bits) - 1) for j in range(per)], -1)
    q = q.reshape(*words.shape[:-1], words.shape[-1] * per).astype(np.float32)
    s = np.repeat(scales.to(torch.float32).numpy(), GS, axis=-1)
    b = np.repeat(biases.to(torch.float32).numpy(), GS, axis=-1)
    return (s * q + b).astype(np.float32)


def self_test_pack():
    assert int(pack_bits(np.arange(8), 4)[0]) == 0x76543210
    assert int(pack_bits(np.arange(4), 8)[0]) == 0x03020100
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        q = rng.integers(0, 1 << bits, (3, 128))
        s = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
        b = torch.full((3, 2), -1.0, dtype=torch.bfloat16)
        dq = mlx_dequantize(pack_bits(q, bits), s, b, bits)
        assert np.array_equal(dq, 0.5 * q - 1.0)
        w = rng.standard_normal((5, 128)).astype(np.float32)
        words, sc, bi = mlx_quantize(w, bits)
        err = np.abs(mlx_dequantize(words, sc, bi, bits) - w).max()
        step = (w.max() - w.min()) / ((1 << bits) - 1)
        assert err < 2 * step, (bits, err, step)
    print("MLX pack self-test ok (4-bit word0 = 0x76543210, 8-bit word0 = 0x03020100)")


MLX_SHIFTED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
               ".q_norm.weight", ".k_norm.weight")


def make_mlx(out, seed, fidx, name, cls, config, family, bits, vl):
    print(f"\n=== {name} ({cls.__name__}, MLX affine {bits}-bit group {GS})")
    dirn = os.path.join(out, name)
    os.makedirs(dirn, exist_ok=True)
    model = build_model(cls, config)
    sd = randomize(model, seed * 100 + fidx, family, False, keep_f32=("A_log",))
    with tempfile.TemporaryDirectory() as tmp:
        hf_saved_keys(model, tmp)  # for config.json / generation_config.json
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = edit_config(json.load(f), family)
        gc = os.path.join(tmp, "generation_config.json")
        if os.path.exists(gc):
            shutil.copy(gc, os.path.join(dirn, "generation_config.json"))

    def to_mlx_name(k):
        if not vl:
            return k
        if k.startswith("model.language_model."):
            return "language_model.model." + k[len("model.language_model."):]
        if k.startswith("lm_head."):
            return "language_model." + k
        if k.startswith("model.visual."):
            return "vision_tower." + k[len("model.visual."):]
        raise KeyError(k)

    mlx = {}       # MLX key -> tensor / array
    hf_new = {}    # HF in-memory key -> float32 value the reference uses
    overrides = {}
    qinfo = []
    for k, v in sd.items():
        mk = to_mlx_name(k)
        if mk.startswith("vision_tower."):
            t = v.to(torch.bfloat16)
            if mk.endswith("patch_embed.proj.weight") and t.ndim == 5:
                t = t.permute(0, 2, 3, 4, 1).contiguous()  # mlx-vlm stores conv channels-last
            mlx[mk] = t
            hf_new[k] = v
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            base = mk[: -len("experts.gate_up_proj")] + "switch_mlp."
            inter = v.shape[1] // 2
            parts = {"gate_proj": v[:, :inter], "up_proj": v[:, inter:]}
            deq = {}
            for pn, pv in parts.items():
                wq, s, b = mlx_quantize(pv.numpy(), bits)
                mlx[base + pn + ".weight"], mlx[base + pn + ".scales"], mlx[base + pn + ".biases"] = wq, s, b
                deq[pn] = torch.from_numpy(mlx_dequantize(wq, s, b, bits))
                qinfo.append(float((deq[pn] - pv).abs().max()))
            hf_new[k] = torch.cat([deq["gate_proj"], deq["up_proj"]], 1)
            continue
        if k.endswith("mlp.experts.down_proj"):
            base = mk[: -len("experts.down_proj")] + "switch_mlp.down_proj"
            wq, s, b = mlx_quantize(v.numpy(), bits)
            mlx[base + ".weight"], mlx[base + ".scales"], mlx[base + ".biases"] = wq, s, b
            hf_new[k] = torch.from_numpy(mlx_dequantize(wq, s, b, bits))
            continue
        if k.endswith("A_log"):
            mlx[mk] = v.to(torch.float32)
            hf_new[k] = v
            continue
        if "conv1d.weight" in k:
            t = v.to(torch.bfloat16)
            mlx[mk] = t.permute(0, 2, 1).contiguous()  # HF [C, 1, K] -> MLX [C, K, 1]
            hf_new[k] = v
            continue
        if v.ndim == 1:
            if any(mk.endswith(sfx) for sfx in MLX_SHIFTED):
                stored = (1.0 + v).to(torch.bfloat16)
                mlx[mk] = stored
                hf_new[k] = stored.to(torch.float32) - 1.0
            else:
                mlx[mk] = v.to(torch.bfloat16)
                hf_new[k] = v
            continue
        assert v.ndim == 2 and v.shape[-1] % GS == 0, (k, v.shape)
        mod = mk[: -len(".weight")]
        b_here = bits
        if mod.endswith("mlp.gate") or mod.endswith("shared_expert_gate"):
            b_here = 8
            overrides[mod] = {"group_size": GS, "bits": 8}
        wq, s, b = mlx_quantize(v.numpy(), b_here)
        mlx[mod + ".weight"], mlx[mod + ".scales"], mlx[mod + ".biases"] = wq, s, b
        hf_new[k] = torch.from_numpy(mlx_dequantize(wq, s, b, b_here))
        qinfo.append(float((hf_new[k] - v).abs().max()))
    assert set(hf_new) == set(sd)
    print(f"  quantized {sum(1 for k in mlx if k.endswith('.scales'))} tensors, "
          f"max |w - deq(w)| {max(qinfo):.4f}; 8-bit overrides {len(overrides)}")
    model.load_state_dict(hf_new, strict=True)
    ref = reference(model, seed, fidx)
    # files
    write_safetensors(os.path.join(dirn, "model.safetensors"), mlx, {"format": "mlx"})
    total = sum(len(tensor_entry(v)[3]) for v in mlx.values())
    with open(os.path.join(dirn, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: "model.safetensors" for k in sorted(mlx)}}, f, indent=2)
    q = {"group_size": GS, "bits": bits, "mode": "affine"}
    q.update(dict(sorted(overrides.items())))
    cfg["quantization"] = q
    cfg["quantization_config"] = copy.deepcopy(q)
    with open(os.path.join(dirn, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    print("  config.json: " + json.dumps(cfg, sort_keys=True))
    show_keys("MLX file", {k: (tensor_entry(v)[0], tensor_entry(v)[2]) for k, v in mlx.items()})
    # reload with our own reader: dequantize, unshift, rename back, compare logits
    back = read_safetensors(os.path.join(dirn, "model.safetensors"))
    check_with_library(os.path.join(dirn, "model.safetensors"))
    with open(os.path.join(dirn, "config.json")) as f:
        qcfg = json.load(f)["quantization"]
    hf_back = {}
    for k in sd:
        mk = to_mlx_name(k)
        if mk.startswith("vision_tower."):
            hf_back[k] = hf_new[k]
            continue
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            base = mk[: mk.index("experts.")] + "switch_mlp."
            if k.endswith("gate_up_proj"):
                g_ = mlx_dequantize(back[base + "gate_proj.weight"], back[base + "gate_proj.scales"],
                                    back[base + "gate_proj.biases"], qcfg["bits"])
                u_ = mlx_dequantize(back[base + "up_proj.weight"], back[base + "up_proj.scales"],
                                    back[base + "up_proj.biases"], qcfg["bits"])
                hf_back[k] = torch.from_numpy(np.concatenate([g_, u_], 1))
            else:
                hf_back[k] = torch.from_numpy(mlx_dequantize(
                    back[base + "down_proj.weight"], back[base + "down_proj.scales"],
                    back[base + "down_proj.biases"], qcfg["bits"]))
            continue
        mod = mk[: -len(".weight")]
        if mod + ".scales" in back:
            bb = qcfg.get(mod, {}).get("bits", qcfg["bits"])
            hf_back[k] = torch.from_numpy(mlx_dequantize(back[mk], back[mod + ".scales"],
                                                         back[mod + ".biases"], bb))
            continue
        t = back[mk].to(torch.float32)
        if "conv1d.weight" in k:
            t = t.permute(0, 2, 1)
        if any(mk.endswith(sfx) for sfx in MLX_SHIFTED):
            t = t - 1.0
        hf_back[k] = t
    m3 = build_model(cls, config)
    m3.load_state_dict(hf_back, strict=True)
    own_diff = logits_diff(m3, ref)
    print(f"  own-reader MLX reload: max|dlogit| {own_diff}")
    assert own_diff == 0.0, own_diff
    layout = f"mlx-affine-q{bits}-g{GS}" + ("-vl" if vl else "")
    meta = dict(fixture=name, model_type=cfg.get("model_type"), architecture=cls.__name__,
                layout=layout, seed=seed, files=["model.safetensors"], bits=bits, group_size=GS,
                note="reference = transformers on the dequantized weights (scale*q+bias, f32), "
                     "norms unshifted (stored - 1)")
    save_ref(dirn, ref, meta)
    print(f"  max|logit| {ref['max_abs_logit']:.3f}  min margin {ref['min_margin']:.4f}  "
          f"prompt {ref['prompt']}  greedy {ref['greedy']}")
    return dict(name=name, model_type=cfg.get("model_type"), layout=layout,
                max_abs_logit=ref["max_abs_logit"], min_margin=ref["min_margin"],
                hf_reload=None, own_reload=own_diff, greedy=ref["greedy"])


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(args.out, exist_ok=True)
    print(f"transformers {transformers.__version__}  torch {torch.__version__}  numpy {np.__version__}")
    self_test_pack()

    jobs = [
        ("qwen3_5_moe_vl", lambda: make_hf(args.out, args.seed, 1, "qwen3_5_moe_vl",
                                           transformers.Qwen3_5MoeForConditionalGeneration,
                                           cfg_qwen3_5_vl(), "qwen3_5_moe", "fused", extra_mtp=True,
                                           shards=2)),
        ("qwen3_5_moe_text", lambda: make_hf(args.out, args.seed, 2, "qwen3_5_moe_text",
                                             transformers.Qwen3_5MoeForCausalLM, cfg_qwen3_5_text(),
                                             "qwen3_5_moe", "per_expert")),
        ("qwen3_next", lambda: make_hf(args.out, args.seed, 3, "qwen3_next",
                                       transformers.Qwen3NextForCausalLM, cfg_qwen3_next(),
                                       "qwen3_next", "per_expert")),
        ("qwen3_moe_experts", lambda: make_hf(args.out, args.seed, 4, "qwen3_moe_experts",
                                              transformers.Qwen3MoeForCausalLM,
                                              cfg_qwen3_moe(True, []), "qwen3_moe", "per_expert_tied")),
        ("qwen3_moe_fused", lambda: make_hf(args.out, args.seed, 5, "qwen3_moe_fused",
                                            transformers.Qwen3MoeForCausalLM,
                                            cfg_qwen3_moe(False, [1]), "qwen3_moe", "fused")),
        ("qwen3_5_moe_mlx4", lambda: make_mlx(args.out, args.seed, 6, "qwen3_5_moe_mlx4",
                                              transformers.Qwen3_5MoeForConditionalGeneration,
                                              cfg_qwen3_5_vl(), "qwen3_5_moe", 4, vl=True)),
        ("qwen3_next_mlx8", lambda: make_mlx(args.out, args.seed, 7, "qwen3_next_mlx8",
                                             transformers.Qwen3NextForCausalLM, cfg_qwen3_next(),
                                             "qwen3_next", 8, vl=False)),
    ]
    only = [s for s in args.only.split(",") if s]
    rows, failed = [], []
    for name, job in jobs:
        if only and name not in only:
            continue
        try:
            rows.append(job())
        except Exception as e:
            traceback.print_exc()
            failed.append((name, repr(e)))
    print(f"\nsummary (seed {args.seed}, out {args.out})")
    print(f"{'fixture':20s} {'model_type':18s} {'layout':24s} {'max|logit|':>10s} {'min margin':>10s} "
          f"{'hf reload':>10s} {'own reload':>10s}  greedy")
    for r in rows:
        hf = "n/a" if r["hf_reload"] is None else f"{r['hf_reload']:.2e}"
        print(f"{r['name']:20s} {str(r['model_type']):18s} {r['layout']:24s} {r['max_abs_logit']:10.3f} "
              f"{r['min_margin']:10.4f} {hf:>10s} {r['own_reload']:10.2e}  {r['greedy']}")
    for name, err in failed:
        print(f"{name:20s} FAILED: {err}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
