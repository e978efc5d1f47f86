"""`fedlesion simulate`: a multi-center study of aggregation rules against centralized and local training, run by the
federation's own coordinator and sites on loopback, and its report (`fedlesion report`)."""
