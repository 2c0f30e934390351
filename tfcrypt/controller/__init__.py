"""The controller side: what an operator (or the TF/Kubernetes controller) writes to etcd,
signed with the controller's SVID: workloads, policies; and the read-only views built
from etcd (list, explain, plan)."""
