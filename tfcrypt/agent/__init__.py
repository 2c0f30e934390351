"""The agent: joins the sources (Workload API, etcd) to the core and the dataplane."""
