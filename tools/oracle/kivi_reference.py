#!/usr/bin/env python3
"""Independent numpy oracle for KIVI on the real model: protocols A and C of docs/eval-cli.md.

A second implementation of everything between the GGUF file and the perplexity, sharing no code
with the Rust workspace: the SmolLM2 decoder in numpy (weights dequantized by the `gguf`
package), the tokenizer rebuilt with `tokenizers` from the GGUF's vocabulary and merges
(checked against the token ids in shared/fixtures when they are there), and KIVI's fake
quantization written from the reference's description (jy-yuan/KIVI, `models/llama_kivi.py`,
`quant/new_pack.py`): keys per channel in groups of G tokens, values per token in groups of G
channels, asymmetric min/max with fp16 scale and minimum, round and clamp; the prefill
quantizes len - len % R keys and all but the last R values; in decode the reference attends
first and spills afterwards (a full key window of R, then the oldest of R + 1 values). Cached
keys and values are rounded to fp16 (the reference runs in fp16); the current block attends
with its own keys and values as computed.

    pip install numpy gguf tokenizers
    python3 tools/oracle/kivi_reference.py --protocol a  full kivi:2 kivi:4 kivi:4,2
    python3 tools/oracle/kivi_reference.py --protocol stream  full kivi:2 kivi:2:eager

A method is `full` or `kivi:KEY_BITS[,VALUE_BITS][:eager]`; `:eager` spills before the step
attends (the order this workspace used before it matched the reference). Group 32 and
residual 128 unless --group / --residual say otherwise. Runs on the CPU in about a minute per
protocol-A method and three per stream method.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf.quants import dequantize
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ASSETS = os.environ.get("KV_ASSETS_DIR", os.path.join(ROOT, "assets"))
MODEL = os.path.join(ASSETS, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(ASSETS, "text", "prideprejudice.txt")
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "kvpress-smollm2-pp",
                       "prefill_kv_layers_0_14_29.safetensors")


def f16(x):
    return x.astype(np.float16).astype(np.float32)


def quantize_groups(x, bits):
    """KIVI's asymmetric min/max quantizer along the last axis, fp16 statistics."""
    mn = f16(x.min(-1, keepdims=True))
    mx = f16(x.max(-1, keepdims=True))
    scale = f16((mx - mn) / (2 ** bits - 1))
    q = np.clip((x - mn) / np.where(scale == 0, 1, scale), 0, 2 ** bits - 1).round()
    return q * scale + mn


def quantize_keys(k, bits, g):
    """Keys `[h, t, d]` (t a multiple of g): per channel, groups of g consecutive tokens."""
    h, t, d = k.shape
    x = k.reshape(h, t // g, g, d).transpose(0, 1, 3, 2)
    return quantize_groups(x, bits).transpose(0, 1, 3, 2).reshape(h, t, d)


def quantize_values(v, bits, g):
    """Values `[h, t, d]`: per token, groups of g consecutive channels."""
    h, t, d = v.shape
    return quantize_groups(v.reshape(h, t, d // g, g), bits).reshape(h, t, d)


class Model:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        f = lambda k: r.fields[k].contents()
        self.layers = f("llama.block_count")
        self.dim = f("llama.embedding_length")
        self.heads = f("llama.attention.head_count")
        self.kv_heads = f("llama.attention.head_count_kv")
        self.head_dim = self.dim // self.heads
        self.eps = f("llama.attention.layer_norm_rms_epsilon")
        base = f("llama.rope.freq_base")
        self.w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in r.tensors}
        self.emb = self.w["token_embd.weight"].reshape(-1, self.dim)
        self.out = self.w.get("output.weight", self.emb).reshape(-1, self.dim)
        self.inv = base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.vocab = f("tokenizer.ggml.tokens")
        self.merges = f("tokenizer.ggml.merges")

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        # llama.cpp's GGUF stores Q/K rows permuted for interleaved pairs (2i, 2i + 1).
        ang = pos[:, None].astype(np.float64) * self.inv[None, :]
        c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        a, b = x[..., 0::2], x[..., 1::2]
        o = np.empty_like(x)
        o[..., 0::2] = a * c - b * s
        o[..., 1::2] = a * s + b * c
        return o

    def qkv(self, l, x, pos):
        p, hd = f"blk.{l}.", self.head_dim
        h = self.rms(x, self.w[p + "attn_norm.weight"])
        split = lambda y, n: y.reshape(-1, n, hd).transpose(1, 0, 2)
        q = split(h @ self.w[p + "attn_q.weight"].T, self.heads)
        k = split(h @ self.w[p + "attn_k.weight"].T, self.kv_heads)
        v = split(h @ self.w[p + "attn_v.weight"].T, self.kv_heads)
        return self.rope(q, pos), self.rope(k, pos), v

    def attend(self, q, keys, values, past):
        """q `[H, t, d]` at the last t of past + t positions; causal within the block."""
        t, n = q.shape[1], keys.shape[1]
        mask = np.triu(np.full((t, n), -np.inf, dtype=np.float32), k=past + 1)
        o = np.empty_like(q)
        group = self.heads // self.kv_heads
        for i in range(self.heads):
            s = q[i] @ keys[i // group].T / np.sqrt(self.head_dim) + mask
            e = np.exp(s - s.max(-1, keepdims=True))
            o[i] = (e / e.sum(-1, keepdims=True)) @ values[i // group]
        return o

    def finish(self, l, x, o):
        p = f"blk.{l}."
        x = x + o.transpose(1, 0, 2).reshape(x.shape[0], self.dim) @ self.w[p + "attn_output.weight"].T
        h = self.rms(x, self.w[p + "ffn_norm.weight"])
        gate = h @ self.w[p + "ffn_gate.weight"].T
        up = h @ self.w[p + "ffn_up.weight"].T
        return x + ((gate / (1 + np.exp(-gate))) * up) @ self.w[p + "ffn_down.weight"].T

    def logits(self, x):
        return self.rms(x, self.w["output_norm.weight"]) @ self.out.T


def tokenize(model, text_path, start, n):
    vocab = {t: i for i, t in enumerate(model.vocab)}
    merges = [tuple(m.split(" ", 1)) for m in model.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    text = open(text_path, encoding="utf-8").read()
    if os.path.exists(FIXTURE):  # kvpress's 512 ids from the start of the book
        raw = open(FIXTURE, "rb").read()
        hl = struct.unpack("<Q", raw[:8])[0]
        a, b = json.loads(raw[8:8 + hl])["input_ids"]["data_offsets"]
        want = np.frombuffer(raw[8 + hl + a:8 + hl + b], dtype=np.int64).tolist()
        if tok.encode(text[:8000]).ids[:len(want)] != want:
            sys.exit("tokenizer disagrees with the fixture's input_ids")
    ids = tok.encode(text[text.index(start):][: 20 * n]).ids[:n]
    if len(ids) < n:
        sys.exit(f"the text has only {len(ids)} tokens after {start!r}")
    return np.array(ids, dtype=np.int64)


def lse(z):
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]


def perplexity(logits, targets):
    return float(np.exp((lse(logits) - logits[np.arange(len(targets)), targets]).mean()))


def parse(method):
    if method == "full":
        return None
    parts = method.split(":")
    if parts[0] != "kivi" or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "eager"):
        sys.exit(f"bad method {method!r}: full or kivi:BITS[,VALUE_BITS][:eager]")
    bits = [int(b) for b in parts[1].split(",")]
    return bits[0], bits[-1], len(parts) == 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", choices=["a", "stream"], default="a")
    ap.add_argument("--prefill", type=int, default=3072)
    ap.add_argument("--score", type=int, default=1024)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--start-at", default="It is a truth universally")
    ap.add_argument("methods", nargs="+")
    a = ap.parse_args()
    methods = [(m, parse(m)) for m in a.methods]
    m = Model(MODEL)
    ids = tokenize(m, TEXT, a.start_at, a.prefill + a.score)
    pf, sc, g, r = a.prefill, a.score, a.group, a.residual

    # Prefill with full attention; keep every layer's post-RoPE keys and values.
    x, pos, cache = m.emb[ids[:pf]], np.arange(pf), []
    for l in range(m.layers):
        q, k, v = m.qkv(l, x, pos)
        x = m.finish(l, x, m.attend(q, k, v, 0))
        cache.append((k, v))
    first = m.logits(x[-1:])
    targets = ids[pf:pf + sc]

    for name, spec in methods:
        # Per layer: [quantized keys, window keys, quantized values, window values].
        state = []
        for k, v in cache:
            if spec is None:
                state.append([k, k[:, :0], v, v[:, :0]])
                continue
            kb, vb, _ = spec
            nk, nv = pf - pf % r, max(pf - r, 0)
            k, v = f16(k), f16(v)  # the reference runs in fp16
            state.append([quantize_keys(k[:, :nk], kb, g), k[:, nk:],
                          quantize_values(v[:, :nv], vb, g), v[:, nv:]])
        if a.protocol == "a":
            x, pos = m.emb[ids[pf:pf + sc]], np.arange(pf, pf + sc)
            for l in range(m.layers):
                q, k, v = m.qkv(l, x, pos)
                s = state[l]
                keys = np.concatenate([s[0], s[1], k], 1)
                values = np.concatenate([s[2], s[3], v], 1)
                x = m.finish(l, x, m.attend(q, keys, values, pf))
            logits = np.concatenate([first, m.logits(x[:-1])], 0)
        else:
            rows = [first]
            for i in range(sc - 1):
                x, pos = m.emb[ids[pf + i:pf + i + 1]], np.array([pf + i])
                for l in range(m.layers):
                    q, k, v = m.qkv(l, x, pos)
                    s = state[l]
                    s[1] = np.concatenate([s[1], f16(k)], 1)
                    s[3] = np.concatenate([s[3], f16(v)], 1)
                    def do_spill():
                        if spec is None:
                            return
                        if s[1].shape[1] == r:
                            s[0] = np.concatenate([s[0], quantize_keys(s[1], spec[0], g)], 1)
                            s[1] = s[1][:, :0]
                        if s[3].shape[1] > r:
                            s[2] = np.concatenate([s[2], quantize_values(s[3][:, :1], spec[1], g)], 1)
                            s[3] = s[3][:, 1:]
                    eager = spec is not None and spec[2]
                    if eager:
                        do_spill()
                    # The current token is attended as computed (fp32), the window in fp16.
                    keys = np.concatenate([s[0], s[1]], 1)
                    values = np.concatenate([s[2], s[3]], 1)
                    keys[:, -1:], values[:, -1:] = k, v
                    x = m.finish(l, x, m.attend(q, keys, values, keys.shape[1] - 1))
                    if not eager:
                        do_spill()
                rows.append(m.logits(x))
            logits = np.concatenate(rows, 0)
        print(f"{name}\t{perplexity(logits, targets):.3f}", flush=True)


if __name__ == "__main__":
    main()
