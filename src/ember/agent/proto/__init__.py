"""The agent's protocol: agent.proto and its generated code, shipped into the guest.

``AGENT_SERVICE`` is the service's name on the wire, read from the descriptor:
the one name every host-side caller (the AgentClient, the monitor's forwarder,
the shim, the metrics) imports from here, since the guest never imports host code.
"""

from ember.agent.proto import agent_pb2

AGENT_SERVICE: str = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
