rule aggregate:
    """One table (CSV + Markdown) over methods x sparsities with every metric and the
    wall time and peak memory of each stage, a plot per metric, and sparsity profiles."""
    input:
        evals=lambda wc: expand("results/{model}/{row}/eval/{task}.json", model=wc.model, row=rows(),
                                task=evals_of(wc.model)),
        layout="results/{model}/layout.json",
        reference=[REFERENCE] if REFERENCE else [],
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
        py=run_python,
        explain=explain_python,
        rows=lambda wc: " ".join(rows()),
        reference=lambda wc: f"--reference {shlex.quote(REFERENCE)} --model-name {wc.model}" if REFERENCE else "",
        run_config=lambda wc: f"results/{wc.model}/summary/.config.json",
        conditional=lambda wc: [f"results/{wc.model}/summary/{name}"
                                for name in ("differences.csv", "differences.md", "comparison.csv", "comparison.md")],
        config_json=lambda wc: shlex.quote(json.dumps(config)),
    log:
        "results/{model}/logs/aggregate.log",
    benchmark:
        "results/{model}/benchmarks/aggregate.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        # the workflow's configuration reaches the CLI as a file (too long for a command line); the
        # files the aggregate writes only sometimes (differences when two rows differ, comparison
        # with a reference: covering this model) are no declared outputs, so Snakemake would leave a
        # previous run's beside the new summary: removed first
        "mkdir -p results/{wildcards.model}/summary && rm -f {params.conditional} && "
        "echo {params.config_json} > {params.run_config} && "
        "{params.py} -m ecoflap aggregate --results results/{wildcards.model} --rows {params.rows} "
        "--out-dir results/{wildcards.model}/summary {params.reference} --run-config {params.run_config} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"


rule seed_group:
    """Models that differ only in seed (config seed_groups), summarised together: each metric's
    mean, sd and range over the seeds, the coarse stages' cost as a ratio to one Wanda pass,
    ECoFLaP's wins, ties and losses beyond the spread, and the per-block sparsities chosen."""
    input:
        summaries=lambda wc: expand("results/{model}/summary/summary.csv", model=config["seed_groups"][wc.group]),
    output:
        csv="results/seed_groups/{group}/summary.csv",
        md="results/seed_groups/{group}/summary.md",
        costs="results/seed_groups/{group}/costs.csv",
        metrics=report("results/seed_groups/{group}/metrics.png", category="seed groups", subcategory="{group}",
                       caption="../report/seed_group.rst", labels={"group": "{group}", "figure": "metrics"}),
    params:
        py=run_python,
        explain=explain_python,
        members=lambda wc: " ".join(config["seed_groups"][wc.group]),
        run_config=lambda wc: f"results/seed_groups/{wc.group}/.config.json",
        config_json=lambda wc: shlex.quote(json.dumps(config)),
    log:
        "results/seed_groups/{group}/logs/seed_group.log",
    benchmark:
        "results/seed_groups/{group}/benchmarks/seed_group.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        # (verdicts per metric and the allocations' profiles are written only sometimes: see aggregate)
        "mkdir -p results/seed_groups/{wildcards.group} && "
        "rm -f results/seed_groups/{wildcards.group}/verdicts_*.csv results/seed_groups/{wildcards.group}/profiles.png && "
        "echo {params.config_json} > {params.run_config} && "
        "{params.py} -m ecoflap seed-summary --results results --group {wildcards.group} --members {params.members} "
        "--run-config {params.run_config} --out-dir results/seed_groups/{wildcards.group} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
