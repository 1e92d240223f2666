"""Quality monitoring: cheap checks on every answer, a sampled model judge, rolling windows with alerts, trends,
alert delivery, and the eval-set gate for prompt versions."""
