rule calibration:
    """Seeded token windows (C4 or the embedded Austen text), built once per model."""
    input:
        model="results/{model}/model",
    output:
        windows="results/{model}/calibration.safetensors",
        meta="results/{model}/calibration.safetensors.json",
    params:
        py=PY,
        c=config["calibration"],
        seed=config["seed"],
    log:
        "results/{model}/logs/calibration.log",
    benchmark:
        "results/{model}/benchmarks/calibration.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap calibrate --model {input.model} --source {params.c[source]} "
        "--n-samples {params.c[n_samples]} --seq-len {params.c[seq_len]} --seed {params.seed} "
        "--out {output.windows} > {log} 2>&1"
