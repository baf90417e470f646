"""Hugging Face transformers `generate` on the same workload as volley's bench_llm.

Reads prompts (lists of token ids, all the same length) from a JSON file, generates
--max-new-tokens tokens for each (EOS ignored: min_new_tokens = max_new_tokens) in
batches of --batch-size, and prints one JSON line with the median output tokens/s.

    python llm_transformers.py --model DIR --prompts prompts.json --batch-size 8 \
        --max-new-tokens 32 --device cpu --dtype float32 --runs 3

With --make-model DIR it instead writes a Llama with TinyLlama-1.1B's shape and random
weights (in --dtype) that both engines then load.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def make_model(out, dtype):
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--prompts")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--make-model")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.make_model:
        make_model(a.make_model, dtype)
        return
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    prompts = json.load(open(a.prompts))
    ids = torch.tensor(prompts, dtype=torch.long, device=a.device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
               do_sample=False, pad_token_id=0)

    def run():
        n = 0
        for i in range(0, len(prompts), a.batch_size):
            out = model.generate(input_ids=ids[i:i + a.batch_size],
                                 attention_mask=mask[i:i + a.batch_size], **gen)
            n += (out.shape[1] - ids.shape[1]) * out.shape[0]
        return n

    with torch.inference_mode():
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)
        rates = []
        for _ in range(a.runs):
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            n = run()
            if a.device == "cuda":
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t))
    print(json.dumps({"engine": "transformers", "batch_size": a.batch_size,
                      "tokens_per_s": statistics.median(rates), "runs": rates}))


if __name__ == "__main__":
    main()
