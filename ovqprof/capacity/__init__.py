"""Recall capacity: the training-free associative-memory probe and the trained MQAR benchmark."""
