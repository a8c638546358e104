"""The names of the files a merge writes beside the weights."""

REPORT_NAME = "merge_report.json"
RECIPE_NAME = "nearswap_recipe.yaml"
