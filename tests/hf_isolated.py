"""Run by tests/test_hf.py in a fresh interpreter (`python -I`) where moeut-dist and everything
but torch and transformers cannot be imported: loads an exported transformers directory as a
user of transformers would, and saves what it computes.

Usage: python -I hf_isolated.py HF_DIR REQUEST.json OUT.pt
"""

import json
import sys

# `-I` drops PYTHONPATH and the working directory, but the editable install of moeut-dist (and
# this environment's other packages) would still be found through site-packages: a None entry in
# sys.modules makes `import name` raise ModuleNotFoundError (and find_spec say "not installed").
BLOCKED = ("moeut_dist", "data_prep", "tests", "triton", "deepspeed", "megatron", "sentencepiece",
           "lm_eval", "webdataset")  # fmt: skip
for name in BLOCKED:
    sys.modules[name] = None

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(hf_dir: str, request_path: str, out_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    results = {}
    try:
        import moeut_dist  # noqa: F401

        results["moeut_dist_importable"] = True
    except ImportError:
        results["moeut_dist_importable"] = False

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    results["ids"] = [tokenizer.encode(t, add_special_tokens=False) for t in request["texts"]]
    results["decoded"] = [tokenizer.decode(ids) for ids in results["ids"]]

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokens = torch.tensor(request["tokens"])
    with torch.no_grad():
        results["logits"] = model(tokens).logits
        results["loss"] = model(tokens, labels=tokens).loss
        # The cache by hand, under the argument's older name: the last position's logits again.
        prefix = model(tokens[:, :-1], use_cache=True)
        results["incremental"] = model(tokens[:, -1:], past_key_values=prefix.cache).logits

    greedy = {"do_sample": False, "max_new_tokens": request["max_new_tokens"]}
    prompt = tokenizer(request["prompt"], return_tensors="pt")
    results["prompt_ids"] = prompt.input_ids[0]
    output = model.generate(**prompt, **greedy)[0]
    results["greedy"] = output[prompt.input_ids.shape[1] :]
    results["greedy_text"] = tokenizer.decode(output, skip_special_tokens=True)

    tokenizer.padding_side = "left"
    batch = tokenizer(request["batch_prompts"], return_tensors="pt", padding=True)
    results["padded"] = batch.attention_mask
    results["batch"] = model.generate(**batch, **greedy)[:, batch.input_ids.shape[1] :]
    results["alone"] = []
    for text in request["batch_prompts"]:
        alone = tokenizer(text, return_tensors="pt")
        results["alone"].append(model.generate(**alone, **greedy)[0, alone.input_ids.shape[1] :])

    torch.manual_seed(0)
    results["sampled"] = model.generate(
        **prompt, do_sample=True, top_k=20, top_p=0.9, max_new_tokens=request["max_new_tokens"],
        min_new_tokens=request["max_new_tokens"],
    )  # fmt: skip

    bf16 = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.bfloat16
    ).eval()
    with torch.no_grad():
        results["bf16_logits"] = bf16(tokens).logits.float()
    results["bf16_generated"] = bf16.generate(**prompt, **greedy)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
