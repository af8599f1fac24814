"""Per-document metrics of the ouro_heldout_* tasks (loaded by lm-eval through `!function utils.process_results`)."""

import re


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        # n_tokens: the text re-encoded with the tokenizer that cut the chunks (written by prepare_tasks.py)
        "token_perplexity": (loglikelihood, int(doc["n_tokens"])),
        "word_perplexity": (loglikelihood, len(re.split(r"\s+", text))),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
