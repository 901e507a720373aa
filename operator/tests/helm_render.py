"""Renders and lints a chart with the real Helm engine (helm-python-sdk, a
library build of Helm v4) for the Rust chart tests.

Reads {"chart", "values", "release", "namespace"} as JSON on stdin; writes
{"manifests": {template: text}, "crds": [...], "schema_error": str|null,
"render_error": str|null (a template's `fail`), "lint": {...}} as JSON on
stdout.
"""

import json
import sys

import helm_python as helm


def main() -> None:
    request = json.load(sys.stdin)
    chart_dir = request["chart"]
    values = request.get("values") or {}
    out = {"manifests": {}, "crds": [], "schema_error": None, "render_error": None}
    with helm.Chart.load(chart_dir) as chart:
        out["crds"] = chart.crds
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as e:
            out["schema_error"] = str(e)
        else:
            try:
                out["manifests"] = chart.render(
                    values,
                    name=request.get("release", "flashsale"),
                    namespace=request.get("namespace", "flashsale-system"),
                    is_install=True,
                )
            except helm.HelmRenderError as e:
                out["render_error"] = str(e)
    out["lint"] = helm.lint(chart_dir, values, strict=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
