"""Run by tests/test_hf.py in a fresh interpreter (`python -I`) where moeut-dist and everything
but torch and transformers cannot be imported: loads an exported transformers directory the way
a user of transformers would and saves what it computes.

Usage: python -I hf_isolated.py HF_DIR REQUEST.json OUT.pt
"""

import json
import sys

# `-I` drops PYTHONPATH and the working directory; the editable install of moeut-dist (and the
# other packages of this environment) would still be found on site-packages, so they are made
# unimportable here: a None entry in sys.modules makes `import name` raise ModuleNotFoundError.
BLOCKED = ("moeut_dist", "data_prep", "tests", "triton", "deepspeed", "megatron", "sentencepiece",
           "lm_eval", "webdataset")  # fmt: skip
for name in BLOCKED:
    sys.modules[name] = None

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(hf_dir: str, request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path).read())
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
        labels_out = model(tokens, labels=tokens)
        results["loss"] = labels_out.loss
    prompt = tokenizer(request["prompt"], return_tensors="pt")
    greedy = dict(do_sample=False, max_new_tokens=request["max_new_tokens"])
    results["greedy"] = model.generate(**prompt, **greedy)[0, prompt.input_ids.shape[1] :]
    results["greedy_text"] = tokenizer.decode(results["greedy"], skip_special_tokens=True)
    tokenizer.padding_side = "left"
    batch = tokenizer(request["batch_prompts"], return_tensors="pt", padding=True)
    results["batch"] = model.generate(**batch, **greedy)[:, batch.input_ids.shape[1] :]
    results["alone"] = [
        model.generate(**tokenizer(p, return_tensors="pt"), **greedy)[0, -request["max_new_tokens"] :]
        for p in request["batch_prompts"]
    ]
    sampled = dict(do_sample=True, top_k=20, top_p=0.9, max_new_tokens=request["max_new_tokens"])
    torch.manual_seed(0)
    results["sampled"] = model.generate(**prompt, **sampled)
    bf16 = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.bfloat16)
    with torch.no_grad():
        results["bf16_logits"] = bf16(tokens).logits.float()
    results["bf16_generated"] = bf16.generate(**prompt, **greedy)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
