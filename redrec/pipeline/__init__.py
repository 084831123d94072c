"""The training and monitoring pipelines (Kubeflow Pipelines), their steps and launchers.

``steps`` holds the plain-Python step logic; ``components`` wraps each step as a KFP component;
``pipelines`` wires them (training: data -> features -> train -> evaluate -> gate -> publish ->
deploy -> drift reference; monitoring: drift -> gate -> the training steps); ``local`` runs a
pipeline with ``kfp.local`` on one machine; ``cluster`` compiles and submits for a KFP backend;
``trainjob`` launches distributed training as a Kubeflow Trainer v2 TrainJob.
"""
