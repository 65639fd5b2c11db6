rule download_model:
    """Hub snapshot (pinned revision) or the embedded model converted to safetensors,
    plus the list of prunable layers and their sizes."""
    output:
        model=directory("results/{model}/model"),
        layout="results/{model}/layout.json",
    params:
        py=model_python,
        explain=explain_python,
        # the config entry, with the family the download checks; keys sorted, so a config file
        # listing them in another order does not count as changed settings (and rerun everything);
        # without the keys the download does not read (DOWNLOAD_UNREAD, common.smk: a changed
        # calibration override would re-download the model and redo its dense evaluation); a model
        # trained at download (the embedded CLIP) is trained with the top-level seed
        spec=lambda wc: spec_arg({"family": "causal_lm",
                                  **{k: v for k, v in model_spec(wc).items() if k not in DOWNLOAD_UNREAD},
                                  **({"train_seed": config["seed"]} if model_spec(wc).get("name") in TRAINED_EMBEDDED
                                     else {})}),
    priority: 1  # before evaluations: they then run in pairs of single-threaded jobs (common.smk)
    log:
        "results/{model}/logs/download.log",
    benchmark:
        "results/{model}/benchmarks/download.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap download {params.spec} --out {output.model} "
        "--layout {output.layout} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
