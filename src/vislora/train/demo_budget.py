"""`vislora demo`'s budget: its defaults, in a module light enough for the CLI to show them in `--help`
(vislora.train.demo itself pulls in the trainer and the report)."""

# 56 px: 145 s on a 2-core AVX2 machine on which 112 px took 555 s, with LoRA +4.2 points over the probe
# (docs/training.md, "The demo", has the settings compared)
DEMO_DEFAULTS = {"steps": 150, "batch_size": 32, "train_images": 2000, "test_images": 1000, "image_size": 56}
