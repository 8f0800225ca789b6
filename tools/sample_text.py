#!/usr/bin/env python
"""Generate text from a Hugging Face export (`cola-convert to-hf`), loaded the way any user would load it.

    python tools/sample_text.py hf/demo --prompt "To be, or not to be" --max-new-tokens 60
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a directory written by cola-convert to-hf")
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"sample_text: {args.model_dir} has no config.json; export one with cola-convert to-hf", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    greedy = args.temperature <= 0
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=not greedy,
                         temperature=None if greedy else args.temperature, top_k=None if greedy else 50,
                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
