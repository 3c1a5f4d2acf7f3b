"""Export a checkpoint, run folder or model folder as the plain model folder that
`phoclip.load` reads (config + safetensors + tokenizer + model card); optionally both
towers as ONNX too. The same command as `phoclip-export` (phoclip_cli.export).

    python launch/export_model.py runs/exp1/checkpoints/step_00020000 runs/exp1/export
    python launch/export_model.py runs/exp1/export runs/exp1/export --format onnx
"""
import sys

from phoclip_cli.export import main

if __name__ == "__main__":
    sys.exit(main())
