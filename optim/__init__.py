"""The optimizers (--optimizer), their parameter-group rule and the lr / tau schedules."""
