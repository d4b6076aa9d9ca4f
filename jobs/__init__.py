"""Ray entrypoints of Tina: thin drivers that run `tina` functions inside Ray Train.

    python -m jobs.pipeline --config configs/demo.yaml --out runs/demo
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/demo.yaml \
        --out runs/demo
"""
