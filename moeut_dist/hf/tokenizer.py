"""Our SentencePiece model as a transformers tokenizer (`tokenizer.json`, no sentencepiece needed
to load it).

The conversion is transformers' own (`SpmConverter.build_tokenizer_from_spm_proto`, in its
`convert_slow_tokenizer` module rather than its documented API): it follows the model's
normaliser spec (NFKC, whitespace runs, the dummy prefix), ranks the BPE merges by piece score
and keeps byte fallback, so that it encodes as `SentencePieceProcessor.encode` does. That is the
one place we use it; `tests/test_hf.py` pins the ids on real text and edge strings, with and
without byte fallback.

Our documents convention: shards hold each document's ids followed by `</s>`, so a document is
preceded by `</s>` in training. The tokenizer therefore prepends `</s>` when special tokens are
added (`tokenizer(text)`), and uses it as its beginning-, end- and padding token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from moeut_dist.data import Tokenizer

SENTENCEPIECE_FILE = "tokenizer.model"  # kept beside, for `moeut convert --from-hf`


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer encoding like `tokenizer` (see the module docstring)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    eod = proto.pieces[tokenizer.eod_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eod} $A", pair=f"{eod} $A $B", special_tokens=[(eod, tokenizer.eod_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eod,
        eos_token=eod,
        pad_token=eod,
        unk_token=proto.trainer_spec.unk_piece,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # "</s>" in a text is text, as SentencePiece reads it
        model_max_length=10**30,  # RoPE: no fixed context length
    )


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    hf_tokenizer(tokenizer).save_pretrained(directory)
    shutil.copyfile(tokenizer.path, directory / SENTENCEPIECE_FILE)
