#!/usr/bin/env bash
# OLMo-2 32B SFT: allenai/OLMo-2-0325-32B, lr 4e-6, gradient accumulation 4 (global batch 256), gradient
# checkpointing. The rest of the recipe (data, template, layout, schedule) is shared by the OLMo-2 sizes: see sft.sh
# beside this file.
#
#   bash scripts/train/olmo2/finetune_32b.sh [mason options] [-- trainer flags that override the recipe's]
#   bash scripts/train/olmo2/finetune_32b.sh --partition gpu --account my-project --time 48:00:00
#   bash scripts/train/olmo2/finetune_32b.sh --dry_run            # print the sbatch script, submit nothing
#   bash scripts/train/olmo2/finetune_32b.sh --backend print      # per-node commands for another scheduler
MODEL=allenai/OLMo-2-0325-32B RUN=olmo2_32b_sft LR=4e-6 GA=4 GRAD_CKPT=true \
    exec bash "$(dirname "$0")/sft.sh" "$@"
