"""Kafka: the only package that talks to a broker. The producer and consumer the
runtime uses (:mod:`.transport`, the one module importing aiokafka), reading topics
from the start (:mod:`.reader`), topic provisioning, key placement, and the two
brokers the mesh runs on for development and tests (embedded Tansu, Apache Kafka)."""
