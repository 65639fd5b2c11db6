rule aggregate:
    """One table (CSV + Markdown) over methods x sparsities with every metric and the
    wall time and peak memory of each stage, a plot per metric, and sparsity profiles."""
    input:
        evals=lambda wc: expand("results/{model}/{row}/eval/{task}.json", model=wc.model, row=rows(),
                                task=evals_of(wc.model)),
        layout="results/{model}/layout.json",
    output:
        # report(): what `snakemake --report report.html` shows, grouped by model and stage
        csv=report("results/{model}/summary/summary.csv", category="{model}", subcategory="summary",
                   caption="../report/summary_table.rst", labels={"model": "{model}", "figure": "results table"}),
        md="results/{model}/summary/summary.md",
        metrics=report("results/{model}/summary/metrics.png", category="{model}", subcategory="summary",
                       caption="../report/metrics.rst", labels={"model": "{model}", "figure": "metrics"}),
        profiles=report("results/{model}/summary/profiles.png", category="{model}", subcategory="summary",
                        caption="../report/profiles.rst", labels={"model": "{model}", "figure": "sparsity profiles"}),
        environment=report("results/{model}/summary/environment.txt", category="{model}", subcategory="provenance",
                           caption="../report/environment.rst", labels={"model": "{model}", "figure": "provenance"}),
    params:
        py=PY,
        rows=lambda wc: " ".join(rows()),
        reference=lambda wc: f"--reference {config['reference']} --model-name {wc.model}" if config.get("reference") else "",
        run_config=lambda wc: f"results/{wc.model}/summary/.config.json",
        config_json=lambda wc: shlex.quote(json.dumps(config)),
    log:
        "results/{model}/logs/aggregate.log",
    benchmark:
        "results/{model}/benchmarks/aggregate.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        # the workflow's configuration reaches the CLI as a file (too long for a command line)
        "mkdir -p results/{wildcards.model}/summary && echo {params.config_json} > {params.run_config} && "
        "{params.py} -m ecoflap aggregate --results results/{wildcards.model} --rows {params.rows} "
        "--out-dir results/{wildcards.model}/summary {params.reference} --run-config {params.run_config} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
