"""Does a model give a padded sequence the same logits as the same sequence alone?

    python scripts/padding_invariance.py fixtures/tiny-glm-moe-dsa

Runs three prompts as one right-padded and one left-padded batch and each prompt alone, with
transformers only, and prints the largest logit difference over the real tokens. A family whose
model is not padding-invariant gets "unpadded" (with these figures) in its JSON's runtime section,
so moetool runs it one sequence per batch (deepseek_v32: 0.70, glm_moe_dsa: 1.75 on the tiny
fixtures; tiny-deepseek-v3: 6e-6).
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def forward(self, hidden_states):",
           "Mixture-of-experts models route every token to a few experts."]


def main(path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        worst = 0.0
        with torch.no_grad():
            batched = model(**batch).logits
            for i, text in enumerate(PROMPTS):
                alone = model(**tok(text, return_tensors="pt")).logits[0]
                real = batch["attention_mask"][i].bool()
                worst = max(worst, (batched[i][real] - alone).abs().max().item())
        print(f"{path} {side}-padded: max |batched - alone| logit difference {worst:.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
