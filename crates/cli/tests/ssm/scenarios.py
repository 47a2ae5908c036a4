"""SSM-compatible API scenarios, run with the real AWS CLI (v1) and boto3 against a fleetrun server.

Started by tests/ssm.rs, which runs the server and agents and passes, in the environment:
FLEETRUN_ENDPOINT, FLEETRUN_TOKEN, FLEETRUN_NODES (JSON name -> node id), FLEETRUN_SCRATCH (a dir the
agents can see), AWS_CLI (path of AWS CLI v1's `aws`), AWS_CLI_V2 (AWS CLI v2's) and the access key.
The seed runbook flows of issue 13 run with both CLI major versions (`runbook_flows`). Prints one line per scenario and
"N passed, N failed"; exits non-zero on any failure.

Every raw response boto3 receives is also checked against the SSM model shipped in botocore: member
names, types, enums, lengths and patterns (`conformance`); every EC2 and STS XML answer, errors too,
against the ec2 and sts models and the Query protocol's error shapes (`xml_conformance`).
"""

import datetime
import hashlib
import hmac
import json
import os
import re
import ssl
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError, WaiterError

ENDPOINT = os.environ["FLEETRUN_ENDPOINT"]
# The server is its own CA: urllib trusts the same bundle as the AWS CLI and boto3.
if os.environ.get("AWS_CA_BUNDLE"):
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(
        context=ssl.create_default_context(cafile=os.environ["AWS_CA_BUNDLE"]))))
TOKEN = os.environ["FLEETRUN_TOKEN"]
NODES = json.loads(os.environ["FLEETRUN_NODES"])
SCRATCH = os.environ["FLEETRUN_SCRATCH"]
AWS = os.environ["AWS_CLI"]
AWS_V2 = os.environ["AWS_CLI_V2"]
KEY_ID = os.environ["AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
REGION = os.environ["AWS_DEFAULT_REGION"]

WEB1, WEB2, DB1 = NODES["web-1"], NODES["web-2"], NODES["db-1"]

RAW_RESPONSES = []  # (operation, raw JSON body) of every boto3 call


def client(validate=True, **kw):
    c = boto3.client(
        "ssm",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        config=Config(parameter_validation=validate, retries={"max_attempts": 1}),
        **kw,
    )
    c.meta.events.register("after-call.ssm.*", capture)
    return c


def capture(http_response, model, **_):
    if http_response.status_code == 200:
        RAW_RESPONSES.append((model.name, http_response.content))


SSM = client()
LOOSE = client(validate=False)  # sends what the model forbids, to see the server refuse it


def aws(*args, check=True):
    """Runs the AWS CLI; returns parsed JSON (or None for empty output)."""
    cmd = [AWS, "--endpoint-url", ENDPOINT, "--output", "json", "ssm", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr}")
    if not check:
        return p
    return json.loads(p.stdout) if p.stdout.strip() else None


def aws_svc(service, *args):
    """Runs the AWS CLI for another service (ec2, sts); returns parsed JSON."""
    cmd = [AWS, "--endpoint-url", ENDPOINT, "--output", "json", service, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode != 0:
        raise AssertionError(f"{service} {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return json.loads(p.stdout) if p.stdout.strip() else None


RAW_XML = []  # (service, operation, status, raw XML body) of every EC2 and STS answer boto3 receives


def query_client(service, **kw):
    """An EC2 or STS client whose every raw answer, errors included, is checked (`xml_conformance`)."""
    c = boto3.client(service, endpoint_url=ENDPOINT, region_name=REGION, config=Config(retries={"max_attempts": 1}), **kw)

    def capture_xml(http_response, model, **_):
        RAW_XML.append((service, model.name, http_response.status_code, http_response.content))

    c.meta.events.register(f"after-call.{service}.*", capture_xml)
    return c


EC2 = query_client("ec2")
STS = query_client("sts")


def wait_for(what, fn, timeout=30.0):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def invocation(cid, node):
    return SSM.get_command_invocation(CommandId=cid, InstanceId=node)


def wait_status(cid, node, statuses, timeout=30.0):
    return wait_for(
        f"{cid} on {node} to be one of {statuses}",
        lambda: (lambda r: r if r["Status"] in statuses else None)(invocation(cid, node)),
        timeout,
    )


def error_code(fn, **kw):
    try:
        fn(**kw)
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["Error"].get("Message", "")
    raise AssertionError(f"{fn.__name__}({kw}) succeeded; an error was expected")


def shell(commands, **kw):
    return {"DocumentName": "AWS-RunShellScript", "Parameters": {"commands": commands}, **kw}


SCENARIOS = []


def scenario(fn):
    SCENARIOS.append(fn)
    return fn


@scenario
def send_by_instance_ids_with_the_aws_cli_and_wait():
    out = aws(
        "send-command",
        "--instance-ids", WEB1, WEB2,
        "--document-name", "AWS-RunShellScript",
        "--parameters", 'commands=["echo hello from $FLEETRUN_NODE_ID"]',
        "--comment", "by ids",
    )
    cmd = out["Command"]
    assert cmd["TargetCount"] == 2 and cmd["InstanceIds"] == [WEB1, WEB2], cmd
    assert cmd["DocumentName"] == "AWS-RunShellScript" and cmd["Comment"] == "by ids"
    cid = cmd["CommandId"]
    aws("wait", "command-executed", "--command-id", cid, "--instance-id", WEB1)
    inv = aws("get-command-invocation", "--command-id", cid, "--instance-id", WEB1)
    assert inv["Status"] == "Success" and inv["ResponseCode"] == 0, inv
    assert inv["StandardOutputContent"] == f"hello from {WEB1}\n", inv
    assert inv["PluginName"] == "aws:runShellScript"
    assert re.fullmatch(r"PT\d+(\.\d+)?S", inv["ExecutionElapsedTime"]), inv["ExecutionElapsedTime"]


@scenario
def send_by_tag_with_boto3():
    cmd = SSM.send_command(Targets=[{"Key": "tag:role", "Values": ["web"]}], **shell(["hostname >/dev/null", "echo tagged"]))["Command"]
    assert cmd["TargetCount"] == 2, cmd
    assert cmd["Targets"] == [{"Key": "tag:role", "Values": ["web"]}], cmd["Targets"]
    for node in (WEB1, WEB2):
        inv = wait_status(cmd["CommandId"], node, {"Success", "Failed"})
        assert inv["Status"] == "Success" and inv["StandardOutputContent"] == "tagged\n", inv
    db = error_code(SSM.get_command_invocation, CommandId=cmd["CommandId"], InstanceId=DB1)
    assert db[0] == "InvocationDoesNotExist", db
    # tag-key and InstanceIds=* select too; several targets are ANDed.
    cmd = SSM.send_command(Targets=[{"Key": "tag-key", "Values": ["role"]}], **shell(["true"]))["Command"]
    assert cmd["TargetCount"] == 3, cmd
    cmd = SSM.send_command(Targets=[{"Key": "InstanceIds", "Values": ["*"]}, {"Key": "tag:role", "Values": ["db"]}], **shell(["true"]))["Command"]
    assert cmd["TargetCount"] == 1, cmd


@scenario
def a_send_command_retried_by_botocore_after_a_lost_answer_runs_once():
    # SendCommand has no ClientToken; botocore sends amz-sdk-invocation-id, the same on every retry
    # of one call, and fleetrun takes it as the idempotency key. The first attempt really reaches the
    # server; its answer is dropped as if the connection died, and botocore retries.
    c = boto3.client("ssm", endpoint_url=ENDPOINT, region_name=REGION,
                     config=Config(retries={"max_attempts": 3, "mode": "standard"}))
    seen = []

    def lose_first_answer(request, **_):
        h = lambda k: (lambda v: v.decode() if isinstance(v, bytes) else v)(request.headers.get(k))
        seen.append((h("amz-sdk-invocation-id"), h("amz-sdk-request")))
        if len(seen) == 1:
            raw = c._endpoint.http_session.send(request)
            seen.append(json.loads(raw.content)["Command"]["CommandId"])
            from botocore.exceptions import ConnectionClosedError
            raise ConnectionClosedError(endpoint_url=request.url)
        return None

    c.meta.events.register("before-send.ssm.SendCommand", lose_first_answer)
    marker = os.path.join(SCRATCH, "ssm-idem-" + uuid.uuid4().hex)
    cmd = c.send_command(InstanceIds=[WEB1], **shell([f"echo run >> {marker}"]), Comment="retried")["Command"]
    (first_id, first_req), stored_id, (second_id, second_req) = seen
    assert first_id and first_id == second_id, seen
    assert "attempt=1" in first_req and "attempt=2" in second_req, seen
    assert cmd["CommandId"] == stored_id, (cmd["CommandId"], stored_id)
    inv = wait_status(stored_id, WEB1, {"Success", "Failed"})
    assert inv["Status"] == "Success", inv
    with open(marker) as f:
        assert f.read() == "run\n", "the retried SendCommand ran more or less than once"
    # The same invocation id with another request is refused, as SSM refuses a reused ClientToken.
    def same_id(context, **_):
        context.setdefault("retries", {})["invocation-id"] = first_id
    other = client()
    other.meta.events.register("before-call.ssm.SendCommand", same_id)
    code, msg = error_code(other.send_command, InstanceIds=[WEB1], **shell(["echo other"]))
    assert code == "IdempotentParameterMismatch" and stored_id in msg, (code, msg)


@scenario
def list_commands_and_invocations_paginate_past_50():
    sent = set()
    for i in range(55):
        sent.add(SSM.send_command(InstanceIds=[DB1], **shell([f"echo {i}"]))["Command"]["CommandId"])
    listed = aws("list-commands")["Commands"]  # the CLI follows NextToken by itself
    ids = [c["CommandId"] for c in listed]
    assert len(ids) == len(set(ids)), "duplicates across pages"
    assert sent <= set(ids), f"{len(sent - set(ids))} commands missing from list-commands"
    pages = SSM.get_paginator("list_commands").paginate(PaginationConfig={"PageSize": 7})
    paged = [c["CommandId"] for p in pages for c in p["Commands"]]
    assert set(paged) == set(ids) and len(paged) == len(ids)
    invs = aws("list-command-invocations", "--instance-id", DB1)["CommandInvocations"]
    assert sent <= {i["CommandId"] for i in invs}
    by_filter = aws("list-commands", "--filters", "key=DocumentName,value=AWS-RunShellScript", "key=ExecutionStage,value=Complete", "--instance-id", DB1)
    assert len(by_filter["Commands"]) >= 1
    assert all(c["Status"] in ("Success", "Failed", "TimedOut", "Cancelled") for c in by_filter["Commands"])


@scenario
def get_command_invocation_before_during_and_after():
    mark = os.path.join(SCRATCH, f"go-{uuid.uuid4()}")
    cmd = SSM.send_command(InstanceIds=[WEB1, WEB2], MaxConcurrency="1", **shell([f"while [ ! -f {mark} ]; do sleep 0.05; done", "echo released"]))["Command"]
    cid = cmd["CommandId"]
    running = wait_for("one invocation to run", lambda: next((n for n in (WEB1, WEB2) if invocation(cid, n)["Status"] == "InProgress"), None))
    waiting = WEB2 if running == WEB1 else WEB1
    before = invocation(cid, waiting)
    assert before["Status"] == "Pending" and before["ResponseCode"] == -1, before
    assert before["ExecutionStartDateTime"] == "" and before["ExecutionEndDateTime"] == "", before
    during = invocation(cid, running)
    assert during["ResponseCode"] == -1 and during["ExecutionStartDateTime"] != "" and during["ExecutionEndDateTime"] == "", during
    open(mark, "w").close()
    for n in (WEB1, WEB2):
        after = wait_status(cid, n, {"Success", "Failed"})
        assert after["Status"] == "Success" and after["ResponseCode"] == 0 and after["StandardOutputContent"] == "released\n", after
    full = SSM.list_command_invocations(CommandId=cid, Details=True)["CommandInvocations"]
    plugins = [i["CommandPlugins"][0] for i in full]
    assert all(p["Name"] == "aws:runShellScript" and p["Output"] == "released\n" for p in plugins), plugins
    bare = SSM.list_command_invocations(CommandId=cid)["CommandInvocations"]
    assert all(i["CommandPlugins"] == [] for i in bare)


@scenario
def cancel_command():
    cid = SSM.send_command(InstanceIds=[DB1], **shell(["sleep 60"]))["Command"]["CommandId"]
    wait_status(cid, DB1, {"InProgress"})
    SSM.cancel_command(CommandId=cid)
    inv = wait_status(cid, DB1, {"Cancelled"})
    assert inv["StatusDetails"] == "Cancelled", inv
    cmd = wait_for("the command to end", lambda: (lambda c: c if c["Status"] == "Cancelled" else None)(SSM.list_commands(CommandId=cid)["Commands"][0]))
    assert cmd["CompletedCount"] == 1
    p = aws("wait", "command-executed", "--command-id", cid, "--instance-id", DB1, check=False)
    assert p.returncode != 0 and "Cancelled" in p.stderr + p.stdout, p.stderr


@scenario
def a_team_key_reaches_only_its_nodes():
    """The web team's access key (its user may only touch role=web nodes) through boto3."""
    team = client(aws_access_key_id=os.environ["TEAM_KEY_ID"], aws_secret_access_key=os.environ["TEAM_SECRET"])
    # Its own node: send, wait, read.
    cid = team.send_command(InstanceIds=[WEB1], **shell(["echo team-ok"]))["Command"]["CommandId"]
    wait_for("the team's command", lambda: team.get_command_invocation(CommandId=cid, InstanceId=WEB1)["Status"] == "Success")
    assert team.get_command_invocation(CommandId=cid, InstanceId=WEB1)["StandardOutputContent"] == "team-ok\n"
    # Another team's node, alone or in a mix: refused whole, naming the node; nothing is created.
    newest = lambda: SSM.list_commands(MaxResults=1)["Commands"][0]["CommandId"]  # noqa: E731
    before = newest()
    for ids in ([DB1], [WEB1, DB1]):
        code, message = error_code(team.send_command, InstanceIds=ids, **shell(["echo no"]))
        assert code == "AccessDeniedException" and DB1 in message and WEB1 not in message, (code, message)
    code, _ = error_code(team.send_command, Targets=[{"Key": "tag:role", "Values": ["db"]}], **shell(["echo no"]))
    assert code == "AccessDeniedException", code
    assert newest() == before, "a refused send created a command"
    # An admin's command on the db node: the team can neither read nor cancel it, nor see it listed.
    db_cid = SSM.send_command(InstanceIds=[DB1], **shell(["sleep 30"]))["Command"]["CommandId"]
    for fn, kw in [
        (team.get_command_invocation, {"CommandId": db_cid, "InstanceId": DB1}),
        (team.list_command_invocations, {"CommandId": db_cid, "Details": True}),
        (team.list_commands, {"CommandId": db_cid}),
        (team.cancel_command, {"CommandId": db_cid}),
    ]:
        code, _ = error_code(fn, **kw)
        assert code == "AccessDeniedException", (fn.__name__, code)
    listed = [c["CommandId"] for c in team.list_commands()["Commands"]]
    assert cid in listed and db_cid not in listed, listed
    invs = team.list_command_invocations()["CommandInvocations"]
    assert invs and all(i["InstanceId"] in (WEB1, WEB2) for i in invs), invs
    seen = {i["InstanceId"] for i in team.describe_instance_information()["InstanceInformationList"]}
    assert seen == {WEB1, WEB2}, seen
    assert wait_status(db_cid, DB1, {"InProgress", "Pending"})
    SSM.cancel_command(CommandId=db_cid)
    # Every refusal is in the audit trail under the team's user.
    req = urllib.request.Request(ENDPOINT + "/v1/audit?principal=web-team&limit=1000", headers={"Authorization": "Bearer " + TOKEN})
    status, records = http(req)
    assert status == 200, records
    denied = {r["action"] for r in records if r["result"] == "400 AccessDeniedException"}
    for op in ("SendCommand", "GetCommandInvocation", "ListCommandInvocations", "ListCommands", "CancelCommand"):
        assert "ssm." + op in denied, (op, denied)


@scenario
def describe_instance_information_filters_and_pages():
    def ids(**kw):
        out = []
        for page in SSM.get_paginator("describe_instance_information").paginate(**kw):
            out += [i["InstanceId"] for i in page["InstanceInformationList"]]
        return sorted(out)

    assert ids() == sorted(NODES.values())
    assert ids(Filters=[{"Key": "tag:role", "Values": ["web"]}]) == sorted([WEB1, WEB2])
    assert ids(Filters=[{"Key": "tag-key", "Values": ["role"]}, {"Key": "PingStatus", "Values": ["Online"]}]) == sorted(NODES.values())
    assert ids(Filters=[{"Key": "InstanceIds", "Values": [DB1]}]) == [DB1]
    assert ids(InstanceInformationFilterList=[{"key": "PingStatus", "valueSet": ["ConnectionLost"]}]) == []
    assert ids(PaginationConfig={"PageSize": 5}) == sorted(NODES.values())
    one = SSM.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [WEB1]}])["InstanceInformationList"][0]
    assert one["PingStatus"] == "Online" and one["PlatformType"] == "Linux" and one["ResourceType"] == "ManagedInstance", one
    code = error_code(LOOSE.describe_instance_information, MaxResults=4)
    assert code[0] == "ValidationException", code


@scenario
def documented_errors():
    cases = [
        ("InvalidInstanceId", LOOSE.send_command, dict(InstanceIds=["mi-00000000000000000"], **shell(["true"]))),
        ("DuplicateInstanceId", LOOSE.send_command, dict(InstanceIds=[WEB1, WEB1], **shell(["true"]))),
        ("InvalidDocument", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName="No-Such-Document", Parameters={"commands": ["true"]})),
        ("InvalidDocumentVersion", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentVersion="7", **shell(["true"]))),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName="AWS-RunShellScript", Parameters={"commands": ["true"], "bogus": ["1"]})),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName="AWS-RunShellScript", Parameters={})),
        ("ValidationException", LOOSE.send_command, dict(InstanceIds=[WEB1], TimeoutSeconds=10, **shell(["true"]))),
        ("ValidationException", LOOSE.send_command, dict(InstanceIds=[WEB1], MaxConcurrency="0", **shell(["true"]))),
        ("ValidationException", LOOSE.send_command, dict(InstanceIds=["i-bad"], **shell(["true"]))),
        ("InvocationDoesNotExist", LOOSE.get_command_invocation, dict(CommandId=str(uuid.uuid4()), InstanceId=WEB1)),
        ("InvalidPluginName", LOOSE.get_command_invocation, dict(CommandId=str(uuid.uuid4()), InstanceId=WEB1, PluginName="aws:runPowerShellScript")),
        ("InvalidCommandId", LOOSE.list_commands, dict(CommandId=str(uuid.uuid4()))),
        ("InvalidCommandId", LOOSE.list_command_invocations, dict(CommandId=str(uuid.uuid4()))),
        ("InvalidCommandId", LOOSE.cancel_command, dict(CommandId=str(uuid.uuid4()))),
        ("InvalidNextToken", LOOSE.list_commands, dict(NextToken="not-a-token")),
        ("InvalidNextToken", LOOSE.describe_instance_information, dict(NextToken="fr1.zz")),
        ("InvalidFilterKey", LOOSE.list_commands, dict(Filters=[{"key": "Bogus", "value": "x"}])),
        ("InvalidFilterKey", LOOSE.describe_instance_information, dict(Filters=[{"Key": "Bogus", "Values": ["x"]}])),
        ("InvalidFilterValue", LOOSE.list_commands, dict(Filters=[{"key": "Status", "value": "Sleeping"}])),
        ("InvalidInstanceInformationFilterValue", LOOSE.describe_instance_information, dict(Filters=[{"Key": "PingStatus", "Values": ["Asleep"]}])),
    ]
    wrong = []
    for want, fn, kw in cases:
        got, msg = error_code(fn, **kw)
        if got != want:
            wrong.append(f"{fn.__name__}({kw}): want {want}, got {got} ({msg})")
        elif not msg:
            wrong.append(f"{fn.__name__}: {got} without a message")
    assert not wrong, "\n".join(wrong)


@scenario
def signatures_are_checked():
    bad_secret = client(aws_access_key_id=KEY_ID, aws_secret_access_key="x" * 40)
    assert error_code(bad_secret.list_commands)[0] == "InvalidSignatureException"
    unknown = client(aws_access_key_id="FRAKNOSUCHKEY0000000", aws_secret_access_key=SECRET)
    assert error_code(unknown.list_commands)[0] == "UnrecognizedClientException"
    # A correct signature, but dated 20 minutes ago.
    status, body = signed_post("ListCommands", {}, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=20))
    assert status == 400 and body["__type"] == "InvalidSignatureException" and "expired" in body["message"], body
    # The same request dated now passes: the hand signer agrees with the server.
    status, body = signed_post("ListCommands", {}, datetime.datetime.now(datetime.timezone.utc))
    assert status == 200 and "Commands" in body, body
    # No signature at all.
    req = urllib.request.Request(ENDPOINT + "/", data=b"{}", method="POST", headers={"X-Amz-Target": "AmazonSSM.ListCommands", "Content-Type": "application/x-amz-json-1.1"})
    status, body = http(req)
    assert status == 400 and body["__type"] == "MissingAuthenticationTokenException", body


def signed_post(op, payload, when):
    body = json.dumps(payload).encode()
    host = ENDPOINT.split("://", 1)[1]
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers = {"content-type": "application/x-amz-json-1.1", "host": host, "x-amz-date": amz_date, "x-amz-target": f"AmazonSSM.{op}"}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(["POST", "/", "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, hashlib.sha256(body).hexdigest()])
    scope = f"{date}/{REGION}/ssm/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + SECRET).encode()
    for part in (date, REGION, "ssm", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={KEY_ID}/{scope}, SignedHeaders={signed}, Signature={sig}"
    return http(urllib.request.Request(ENDPOINT + "/", data=body, method="POST", headers=headers))


def http(req):
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@scenario
def output_urls_give_the_full_output():
    script = ["head -c 30000 /dev/zero | tr '\\0' a", "echo oops >&2"]
    cid = SSM.send_command(InstanceIds=[WEB2], **shell(script))["Command"]["CommandId"]
    inv = wait_status(cid, WEB2, {"Success", "Failed"})
    content = inv["StandardOutputContent"]
    assert len(content) == 24000 and content.endswith("--output truncated--"), (len(content), content[-30:])
    assert inv["StandardErrorContent"] == "oops\n"
    req = urllib.request.Request(inv["StandardOutputUrl"], headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        full = r.read()
    assert full == b"a" * 30000, len(full)
    plugin = SSM.list_command_invocations(CommandId=cid, Details=True)["CommandInvocations"][0]["CommandPlugins"][0]
    assert len(plugin["Output"]) <= 2500 and "---Output truncated---" in plugin["Output"] and plugin["Output"].endswith("oops\n"), plugin["Output"][-60:]


def doc_content(greeting_default, extra_step=None):
    steps = [
        {"action": "aws:runShellScript", "name": "greet",
         "precondition": {"StringEquals": ["platformType", "Linux"]},
         "inputs": {"runCommand": ["for n in {{ names }}; do echo {{greeting}} $n; done"]}},
        {"action": "aws:runPowerShellScript", "name": "windowsOnly",
         "precondition": {"StringEquals": ["platformType", "Windows"]},
         "inputs": {"runCommand": ["Write-Output never"]}},
        {"action": "aws:runShellScript", "name": "mode",
         "inputs": {"runCommand": ["echo mode {{ mode }}"], "timeoutSeconds": "60"}},
    ]
    if extra_step:
        steps.append(extra_step)
    return json.dumps({
        "schemaVersion": "2.2",
        "description": "Greets names",
        "parameters": {
            "greeting": {"type": "String", "default": greeting_default, "allowedPattern": "^[a-z]+$"},
            "names": {"type": "StringList", "description": "who", "minItems": 1},
            "mode": {"type": "String", "default": "fast", "allowedValues": ["fast", "slow"]},
        },
        "mainSteps": steps,
    }, indent=2)


DOC_NAME = f"Greeter-{uuid.uuid4().hex[:8]}"


@scenario
def documents_are_created_described_listed_and_versioned():
    v1 = doc_content("hello")
    d = SSM.create_document(Name=DOC_NAME, Content=v1, DocumentType="Command", DocumentFormat="JSON")["DocumentDescription"]
    assert d["Name"] == DOC_NAME and d["DocumentVersion"] == "1" and d["LatestVersion"] == "1" and d["DefaultVersion"] == "1", d
    assert d["Status"] == "Active" and d["SchemaVersion"] == "2.2" and d["DocumentType"] == "Command" and d["DocumentFormat"] == "JSON", d
    assert d["HashType"] == "Sha256" and d["Hash"] == hashlib.sha256(v1.encode()).hexdigest(), d
    assert d["Owner"] not in ("", "Amazon") and d["PlatformTypes"] == ["Linux"] and d["Description"] == "Greets names", d
    params = {p["Name"]: p for p in d["Parameters"]}
    assert set(params) == {"greeting", "names", "mode"}, params
    assert params["greeting"]["DefaultValue"] == "hello" and "DefaultValue" not in params["names"], params
    assert params["names"]["Type"] == "StringList" and params["names"]["Description"] == "who", params
    assert SSM.describe_document(Name=DOC_NAME)["Document"]["Hash"] == d["Hash"]
    got = SSM.get_document(Name=DOC_NAME)
    assert got["Content"] == v1 and got["DocumentVersion"] == "1" and got["Status"] == "Active", got
    mine = [i["Name"] for p in SSM.get_paginator("list_documents").paginate(Filters=[{"Key": "Owner", "Values": ["Self"]}]) for i in p["DocumentIdentifiers"]]
    assert DOC_NAME in mine and "AWS-RunShellScript" not in mine, mine
    amazon = aws("list-documents", "--filters", "Key=Owner,Values=Amazon")["DocumentIdentifiers"]
    assert [i["Name"] for i in amazon] == ["AWS-RunShellScript"], amazon
    legacy = SSM.list_documents(DocumentFilterList=[{"key": "Name", "value": DOC_NAME}])["DocumentIdentifiers"]
    assert [i["Name"] for i in legacy] == [DOC_NAME], legacy
    builtin = SSM.describe_document(Name="AWS-RunShellScript")["Document"]
    assert builtin["Owner"] == "Amazon" and builtin["SchemaVersion"] == "1.2", builtin
    assert {p["Name"]: p.get("DefaultValue") for p in builtin["Parameters"]} == {"commands": None, "workingDirectory": "", "executionTimeout": "3600"}
    # Version 2 with another default greeting; the default version stays 1 until it is moved.
    v2 = doc_content("hi")
    d2 = SSM.update_document(Name=DOC_NAME, Content=v2, DocumentVersion="$LATEST")["DocumentDescription"]
    assert d2["DocumentVersion"] == "2" and d2["LatestVersion"] == "2" and d2["DefaultVersion"] == "1", d2
    assert error_code(SSM.update_document, Name=DOC_NAME, Content=v2, DocumentVersion="$LATEST")[0] == "DuplicateDocumentContent"
    assert error_code(SSM.update_document, Name=DOC_NAME, Content=doc_content("hey"), DocumentVersion="1")[0] == "InvalidDocumentVersion"
    assert SSM.get_document(Name=DOC_NAME, DocumentVersion="$LATEST")["Content"] == v2
    desc = SSM.update_document_default_version(Name=DOC_NAME, DocumentVersion="2")["Description"]
    assert desc == {"Name": DOC_NAME, "DefaultVersion": "2"}, desc
    assert SSM.describe_document(Name=DOC_NAME)["Document"]["DefaultVersion"] == "2"


@scenario
def send_a_document_with_parameters_by_tag_with_the_aws_cli():
    out = aws(
        "send-command",
        "--targets", "Key=tag:role,Values=web",
        "--document-name", DOC_NAME,
        "--parameters", json.dumps({"names": ["alpha", "beta"], "mode": ["slow"]}),
    )
    cmd = out["Command"]
    assert cmd["DocumentName"] == DOC_NAME and cmd["TargetCount"] == 2, cmd
    assert cmd["Parameters"]["names"] == ["alpha", "beta"] and cmd["Parameters"]["mode"] == ["slow"], cmd["Parameters"]
    cid = cmd["CommandId"]
    for node in (WEB1, WEB2):
        inv = wait_status(cid, node, {"Success", "Failed"})
        # Default version 2 greets with "hi"; the Windows step is skipped.
        assert inv["Status"] == "Success" and inv["StandardOutputContent"] == "hi alpha\nhi beta\nmode slow\n", inv
        assert inv["DocumentName"] == DOC_NAME and inv["PluginName"] == "greet", inv
    listed = aws("list-commands", "--command-id", cid)["Commands"][0]
    assert listed["DocumentName"] == DOC_NAME and listed["Parameters"]["greeting"] == ["hi"], listed
    # An explicit version, and a parameter's default overridden.
    cid = SSM.send_command(InstanceIds=[DB1], DocumentName=DOC_NAME, DocumentVersion="1", Parameters={"names": ["x"], "greeting": ["yo"]})["Command"]["CommandId"]
    inv = wait_status(cid, DB1, {"Success", "Failed"})
    assert inv["StandardOutputContent"] == "yo x\nmode fast\n" and inv["DocumentVersion"] == "1", inv


@scenario
def a_failing_step_stops_the_steps_after_it():
    name = f"Steps-{uuid.uuid4().hex[:8]}"
    content = json.dumps({"schemaVersion": "2.2", "mainSteps": [
        {"action": "aws:runShellScript", "name": "first", "inputs": {"runCommand": ["echo one", "exit 0", "echo not-here"]}},
        {"action": "aws:runShellScript", "name": "second", "inputs": {"runCommand": ["echo two", "exit 7"]}},
        {"action": "aws:runShellScript", "name": "third", "inputs": {"runCommand": ["echo three"]}},
    ]})
    SSM.create_document(Name=name, Content=content)
    cid = SSM.send_command(InstanceIds=[WEB1], DocumentName=name)["Command"]["CommandId"]
    inv = wait_status(cid, WEB1, {"Success", "Failed"})
    assert inv["Status"] == "Failed" and inv["ResponseCode"] == 7 and inv["StandardOutputContent"] == "one\ntwo\n", inv
    SSM.delete_document(Name=name)


YAML_DOC = """schemaVersion: '2.2'
description: Says where it runs
parameters:
  word:
    type: String
    default: yaml
mainSteps:
  - action: aws:runShellScript
    name: speak
    inputs:
      runCommand:
        - echo {{ word }} on $(hostname)
        - echo done
"""


@scenario
def a_yaml_document_is_created_run_converted_and_versioned():
    name = f"Yaml-{uuid.uuid4().hex[:8]}"
    d = SSM.create_document(Name=name, Content=YAML_DOC, DocumentFormat="YAML")["DocumentDescription"]
    assert d["DocumentFormat"] == "YAML" and d["SchemaVersion"] == "2.2" and d["Description"] == "Says where it runs", d
    assert d["Hash"] == hashlib.sha256(YAML_DOC.encode()).hexdigest(), d
    assert [(p["Name"], p.get("DefaultValue")) for p in d["Parameters"]] == [("word", "yaml")], d
    # As written, and converted to the format asked for.
    got = SSM.get_document(Name=name)
    assert got["Content"] == YAML_DOC and got["DocumentFormat"] == "YAML", got
    as_json = SSM.get_document(Name=name, DocumentFormat="JSON")
    assert as_json["DocumentFormat"] == "JSON" and json.loads(as_json["Content"])["mainSteps"][0]["name"] == "speak", as_json
    # The same round trip through the AWS CLI, then a run by tag that uses the YAML document.
    cli = aws("get-document", "--name", name, "--document-format", "YAML")
    assert cli["Content"] == YAML_DOC, cli
    cid = aws("send-command", "--targets", "Key=tag:role,Values=db", "--document-name", name,
              "--parameters", json.dumps({"word": ["hello"]}))["Command"]["CommandId"]
    inv = wait_status(cid, DB1, {"Success", "Failed"})
    assert inv["Status"] == "Success" and inv["StandardOutputContent"].startswith("hello on ") and inv["StandardOutputContent"].endswith("\ndone\n"), inv
    # A JSON version 2 (the text of GetDocument's conversion), then the versions listed and paged.
    v2 = json.loads(as_json["Content"])
    v2["description"] = "now JSON"
    SSM.update_document(Name=name, Content=json.dumps(v2), DocumentVersion="$LATEST", DocumentFormat="JSON")
    versions = [v for page in SSM.get_paginator("list_document_versions").paginate(Name=name, PaginationConfig={"PageSize": 1}) for v in page["DocumentVersions"]]
    assert [(v["DocumentVersion"], v["DocumentFormat"], v["IsDefaultVersion"]) for v in versions] == [("1", "YAML", True), ("2", "JSON", False)], versions
    assert error_code(SSM.list_document_versions, Name=f"Missing-{uuid.uuid4().hex[:6]}")[0] == "InvalidDocument"
    builtin = SSM.list_document_versions(Name="AWS-RunShellScript")["DocumentVersions"]
    assert [v["DocumentVersion"] for v in builtin] == ["1"], builtin
    # Bad YAML: a syntax error, an alias bomb, a mapping key given twice and YAML sent as JSON.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    for content, fmt in [("schemaVersion: '2.2'\nmainSteps: [unclosed", "YAML"), (bomb, "YAML"),
                         ("schemaVersion: '2.2'\nschemaVersion: '2.0'\nmainSteps: []\n", "YAML"), (YAML_DOC, "JSON")]:
        code, msg = error_code(LOOSE.create_document, Name=f"Bad-Yaml-{uuid.uuid4().hex[:6]}", Content=content, DocumentFormat=fmt)
        assert code == "InvalidDocumentContent", (code, msg, content[:40])
    assert error_code(LOOSE.create_document, Name=f"Text-{uuid.uuid4().hex[:6]}", Content="x", DocumentFormat="TEXT")[0] == "InvalidDocumentContent"
    SSM.delete_document(Name=name)


@scenario
def instance_tags_are_added_listed_used_and_removed():
    aws("add-tags-to-resource", "--resource-type", "ManagedInstance", "--resource-id", DB1,
        "--tags", "Key=Environment,Value=Production")
    SSM.add_tags_to_resource(ResourceType="ManagedInstance", ResourceId=DB1, Tags=[{"Key": "Team", "Value": "data"}])
    tags = SSM.list_tags_for_resource(ResourceType="ManagedInstance", ResourceId=DB1)["TagList"]
    assert {"Key": "Environment", "Value": "Production"} in tags and {"Key": "role", "Value": "db"} in tags, tags
    # A send by the new tag reaches that node at once.
    cid = SSM.send_command(Targets=[{"Key": "tag:Environment", "Values": ["Production"]}], **shell(["echo tagged"]))["Command"]["CommandId"]
    inv = wait_status(cid, DB1, {"Success", "Failed"})
    assert inv["StandardOutputContent"] == "tagged\n", inv
    assert [i["InstanceId"] for i in SSM.list_command_invocations(CommandId=cid)["CommandInvocations"]] == [DB1]
    SSM.remove_tags_from_resource(ResourceType="ManagedInstance", ResourceId=DB1, TagKeys=["Environment", "Team", "NotThere"])
    tags = SSM.list_tags_for_resource(ResourceType="ManagedInstance", ResourceId=DB1)["TagList"]
    assert all(t["Key"] not in ("Environment", "Team") for t in tags), tags
    # SSM's errors where SSM answers them.
    unknown = "mi-0123456789abcdef0"
    for fn, kw, expected in [
        (SSM.add_tags_to_resource, dict(ResourceType="ManagedInstance", ResourceId=unknown, Tags=[{"Key": "a", "Value": "b"}]), "InvalidResourceId"),
        (SSM.list_tags_for_resource, dict(ResourceType="ManagedInstance", ResourceId="i-nothing"), "InvalidResourceId"),
        (SSM.add_tags_to_resource, dict(ResourceType="Association", ResourceId="a-1", Tags=[{"Key": "a", "Value": "b"}]), "InvalidResourceType"),
        (LOOSE.add_tags_to_resource, dict(ResourceType="Spaceship", ResourceId=DB1, Tags=[{"Key": "a", "Value": "b"}]), "ValidationException"),
        (SSM.add_tags_to_resource, dict(ResourceType="ManagedInstance", ResourceId=DB1, Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(60)]), "TooManyTagsError"),
    ]:
        code, msg = error_code(fn, **kw)
        assert code == expected, (code, msg, kw)


@scenario
def documents_and_parameters_carry_tags():
    name = f"Tagged-{uuid.uuid4().hex[:8]}"
    d = SSM.create_document(Name=name, Content=doc_content("hi"), DocumentType="Command",
                            Tags=[{"Key": "team", "Value": "ops"}])["DocumentDescription"]
    assert d["Tags"] == [{"Key": "team", "Value": "ops"}], d
    aws("add-tags-to-resource", "--resource-type", "Document", "--resource-id", name, "--tags", "Key=tier,Value=gold")
    tags = SSM.list_tags_for_resource(ResourceType="Document", ResourceId=name)["TagList"]
    assert tags == [{"Key": "team", "Value": "ops"}, {"Key": "tier", "Value": "gold"}], tags
    assert SSM.describe_document(Name=name)["Document"]["Tags"] == tags

    def listed(key, values):
        pages = SSM.get_paginator("list_documents").paginate(Filters=[{"Key": key, "Values": values}])
        return [i["Name"] for p in pages for i in p["DocumentIdentifiers"]]
    assert listed("tag:tier", ["gold"]) == [name] and listed("tag:tier", ["silver"]) == []
    assert name in listed("tag-key", ["team"])
    ident = SSM.list_documents(Filters=[{"Key": "tag:tier", "Values": ["gold"]}])["DocumentIdentifiers"][0]
    assert ident["Tags"] == tags, ident
    SSM.remove_tags_from_resource(ResourceType="Document", ResourceId=name, TagKeys=["team", "absent"])
    assert SSM.list_tags_for_resource(ResourceType="Document", ResourceId=name)["TagList"] == [{"Key": "tier", "Value": "gold"}]

    pname = f"/tagged/{uuid.uuid4().hex[:8]}"
    SSM.put_parameter(Name=pname, Value="v1", Type="String", Tags=[{"Key": "env", "Value": "prod"}])
    assert SSM.list_tags_for_resource(ResourceType="Parameter", ResourceId=pname)["TagList"] == [{"Key": "env", "Value": "prod"}]
    described = SSM.describe_parameters(ParameterFilters=[{"Key": "tag:env", "Values": ["prod"]}])["Parameters"]
    assert [x["Name"] for x in described] == [pname], described
    assert SSM.describe_parameters(ParameterFilters=[{"Key": "tag:env", "Values": ["dev"]}])["Parameters"] == []
    # A new version keeps the parameter's tags; tags with Overwrite are SSM's ValidationException.
    SSM.put_parameter(Name=pname, Value="v2", Type="String", Overwrite=True)
    SSM.add_tags_to_resource(ResourceType="Parameter", ResourceId=pname, Tags=[{"Key": "owner", "Value": "sre"}])
    tags = SSM.list_tags_for_resource(ResourceType="Parameter", ResourceId=pname)["TagList"]
    assert tags == [{"Key": "env", "Value": "prod"}, {"Key": "owner", "Value": "sre"}], tags
    code, msg = error_code(SSM.put_parameter, Name=pname, Value="v3", Type="String", Overwrite=True,
                           Tags=[{"Key": "a", "Value": "b"}])
    assert code == "ValidationException" and "tags and overwrite" in msg, (code, msg)
    for fn, kw, expected in [
        (SSM.add_tags_to_resource, dict(ResourceType="Document", ResourceId="No-Such-Doc", Tags=[{"Key": "a", "Value": "b"}]), "InvalidResourceId"),
        (SSM.list_tags_for_resource, dict(ResourceType="Parameter", ResourceId="/no/such/param"), "InvalidResourceId"),
        (SSM.add_tags_to_resource, dict(ResourceType="Parameter", ResourceId=pname, Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(60)]), "TooManyTagsError"),
        (SSM.create_document, dict(Name=f"T-{uuid.uuid4().hex[:8]}", Content=doc_content("hi"), Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(51)]), "TooManyTagsError"),
        (SSM.add_tags_to_resource, dict(ResourceType="Document", ResourceId=name, Tags=[{"Key": "bad key!", "Value": "v"}]), "ValidationException"),
    ]:
        code, msg = error_code(fn, **kw)
        assert code == expected, (code, msg, kw)
    SSM.delete_parameter(Name=pname)
    SSM.delete_document(Name=name)


@scenario
def sessions_are_described_and_terminated():
    env = dict(os.environ, FLEETRUN_SERVER=ENDPOINT, FLEETRUN_TOKEN=TOKEN,
               FLEETRUN_CONFIG=os.path.join(SCRATCH, "cli-sessions.toml"))
    if os.environ.get("AWS_CA_BUNDLE"):
        env["FLEETRUN_CA_CERT"] = os.environ["AWS_CA_BUNDLE"]
    shell_proc = subprocess.Popen([os.environ["FLEETRUN_CLI"], "shell", WEB2, "-c", "echo up; sleep 120"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert shell_proc.stdout.readline() == b"up\n"
        active = wait_for("the shell among active sessions", lambda: [
            s for s in SSM.describe_sessions(State="Active", Filters=[{"key": "Target", "value": WEB2}])["Sessions"]])
        assert len(active) == 1 and active[0]["Status"] == "Connected" and active[0]["Target"] == WEB2, active
        sid = active[0]["SessionId"]
        assert active[0]["Owner"].endswith(":user/admin") and "sleep 120" in active[0]["Details"], active
        mine = SSM.describe_sessions(State="Active", Filters=[{"key": "Owner", "value": active[0]["Owner"]}])["Sessions"]
        assert sid in [s["SessionId"] for s in mine], mine
        assert SSM.describe_sessions(State="History", Filters=[{"key": "SessionId", "value": sid}])["Sessions"] == []
        out = aws("terminate-session", "--session-id", sid)
        assert out == {"SessionId": sid}, out
        shell_proc.wait(timeout=30)
        assert shell_proc.returncode != 0, shell_proc.returncode
    finally:
        if shell_proc.poll() is None:
            shell_proc.kill()
    ended = wait_for("the shell in the history", lambda: SSM.describe_sessions(
        State="History", Filters=[{"key": "SessionId", "value": sid}])["Sessions"])
    assert ended[0]["Status"] == "Terminated" and "EndDate" in ended[0] and "terminated by" in ended[0]["Reason"], ended
    # Terminating it again is not an error; an unknown session is SSM's DoesNotExistException.
    assert SSM.terminate_session(SessionId=sid)["SessionId"] == sid
    assert error_code(SSM.terminate_session, SessionId="no-such-session")[0] == "DoesNotExistException"
    # More sessions, then the history paged one at a time (newest first, nothing twice).
    for i in range(2):
        subprocess.run([os.environ["FLEETRUN_CLI"], "shell", WEB2, "-c", f"echo {i}"], env=env, check=True, capture_output=True, timeout=60)
    pages = list(SSM.get_paginator("describe_sessions").paginate(State="History", PaginationConfig={"PageSize": 1}))
    ids = [s["SessionId"] for p in pages for s in p["Sessions"]]
    assert len(ids) >= 3 and len(set(ids)) == len(ids) and sid in ids, ids
    later = SSM.describe_sessions(State="History", Filters=[{"key": "InvokedAfter", "value": "2100-01-01T00:00:00Z"}])["Sessions"]
    assert later == [], later
    for kw, expected in [
        (dict(State="History", Filters=[{"key": "Colour", "value": "x"}]), ("InvalidFilterKey", "ValidationException")),
        (dict(State="History", NextToken="bogus"), ("InvalidNextToken",)),
        (dict(State="History", Filters=[{"key": "InvokedAfter", "value": "yesterday"}]), ("ValidationException",)),
        (dict(State="Sometime"), ("ValidationException",)),
    ]:
        code, msg = error_code(LOOSE.describe_sessions, **kw)
        assert code in expected, (code, msg, kw)


@scenario
def start_session_hands_out_a_stream_that_fleetrun_shell_joins_once():
    # No API token: the session token alone opens the session.
    env = {k: v for k, v in os.environ.items() if k not in ("FLEETRUN_TOKEN", "FLEETRUN_SERVER")}
    env["FLEETRUN_CONFIG"] = os.path.join(SCRATCH, "cli-start-session.toml")
    if os.environ.get("AWS_CA_BUNDLE"):
        env["FLEETRUN_CA_CERT"] = os.environ["AWS_CA_BUNDLE"]

    def join(started, *extra, typed=b""):
        return subprocess.run(
            [os.environ["FLEETRUN_CLI"], "shell", "-t", "--stream-url", started["StreamUrl"], *extra],
            env=dict(env, FLEETRUN_SESSION_TOKEN=started["TokenValue"]),
            input=typed, capture_output=True, timeout=60)

    def history(sid):
        return wait_for(f"session {sid} in the history", lambda: SSM.describe_sessions(
            State="History", Filters=[{"key": "SessionId", "value": sid}])["Sessions"])

    started = SSM.start_session(Target=WEB1, DocumentName="AWS-StartInteractiveCommand",
                                Parameters={"command": ["echo ticket-$((6*7))"]}, Reason="runbook step 3")
    sid = started["SessionId"]
    assert started["StreamUrl"].split("://")[0] in ("ws", "wss"), started
    assert started["StreamUrl"].endswith(f"/v1/sessions/{sid}/stream") and len(started["TokenValue"]) >= 64, started
    # Nothing runs until the client comes; a wrong token is refused and leaves the ticket usable.
    assert SSM.describe_sessions(State="Active", Filters=[{"key": "SessionId", "value": sid}])["Sessions"] == []
    wrong = join(dict(started, TokenValue="0" * 64))
    assert wrong.returncode != 0 and b"no session ticket" in wrong.stderr, (wrong.returncode, wrong.stderr)
    p = join(started)
    assert p.returncode == 0 and b"ticket-42" in p.stdout, (p.returncode, p.stdout, p.stderr)
    ended = history(sid)
    assert ended[0]["Target"] == WEB1 and ended[0]["DocumentName"] == "AWS-StartInteractiveCommand", ended
    assert ended[0]["Owner"].endswith(":user/admin") and "ticket-" in ended[0]["Details"], ended
    # A token is good once.
    again = join(started)
    assert again.returncode != 0 and b"no session ticket" in again.stderr, (again.returncode, again.stderr)

    # The default document is the login shell, typed into.
    started = SSM.start_session(Target=WEB1)
    p = join(started, typed=b"echo shell-$((6*7)); exit 3\n")
    assert p.returncode == 3 and b"shell-42" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert history(started["SessionId"])[0]["DocumentName"] == "SSM-SessionManagerRunShell"
    # A session for a command cannot be joined as another command (the CLI's -c is refused outright).
    p = join(SSM.start_session(Target=WEB1), "-c", "id")
    assert p.returncode != 0 and b"cannot be used with" in p.stderr, p.stderr

    # `aws ssm start-session` runs `session-manager-plugin`: fleetrun, linked under that name.
    plugin_dir = os.path.join(SCRATCH, "plugin-bin")
    os.makedirs(plugin_dir, exist_ok=True)
    link = os.path.join(plugin_dir, "session-manager-plugin")
    if not os.path.lexists(link):
        os.symlink(os.environ["FLEETRUN_CLI"], link)
    cli_env = dict(os.environ, PATH=plugin_dir + os.pathsep + os.environ["PATH"], AWS_PAGER="")
    for path in (AWS, AWS_V2):
        p = subprocess.run([path, "--endpoint-url", ENDPOINT, "ssm", "start-session", "--target", WEB2,
                            "--document-name", "AWS-StartInteractiveCommand",
                            "--parameters", "command=echo plugin-$((6*7))"],
                           env=cli_env, input=b"", capture_output=True, timeout=120)
        assert p.returncode == 0 and b"plugin-42" in p.stdout, (path, p.returncode, p.stdout, p.stderr)
    # Without the plugin, the AWS CLI terminates the session it started (its ticket goes) and says so.
    bare = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, "session-manager-plugin")))
    for path in (AWS, AWS_V2):
        p = subprocess.run([path, "--endpoint-url", ENDPOINT, "ssm", "start-session", "--target", WEB2],
                           env=dict(os.environ, PATH=bare, AWS_PAGER=""), capture_output=True, timeout=120)
        assert p.returncode != 0 and b"SessionManagerPlugin is not found" in p.stderr, (path, p.returncode, p.stderr)
    started = SSM.start_session(Target=WEB2)
    assert SSM.terminate_session(SessionId=started["SessionId"])["SessionId"] == started["SessionId"]
    p = join(started)
    assert p.returncode != 0 and b"no session ticket" in p.stderr, (p.returncode, p.stderr)

    for kw, expected in [
        (dict(Target=WEB1, DocumentName="AWS-StartPortForwardingSession",
              Parameters={"portNumber": ["80"]}), ("InvalidDocument", "port-forward")),
        (dict(Target=WEB1, DocumentName="My-Own-Session"), ("InvalidDocument", "not My-Own-Session")),
        (dict(Target=WEB1, DocumentName="AWS-StartInteractiveCommand"), ("InvalidParameters", "command")),
        (dict(Target=WEB1, DocumentName="AWS-StartInteractiveCommand",
              Parameters={"command": ["id"], "colour": ["red"]}), ("InvalidParameters", "colour")),
        (dict(Target=WEB1, Parameters={"command": ["id"]}), ("InvalidParameters", "command")),
        (dict(Target="mi-0123456789abcdef0"), ("TargetNotConnected", "not connected")),
        (dict(Target="not-an-instance"), ("TargetNotConnected", "not connected")),
        (dict(Target=WEB1, Reason="x" * 257), ("ValidationException", "reason")),
    ]:
        code, msg = error_code(LOOSE.start_session, **kw)
        assert (code, expected[1] in msg) == (expected[0], True), (code, msg, kw)


@scenario
def ec2_and_sts_lookups_that_ssm_tools_make():
    me = STS.get_caller_identity()
    assert me["Arn"].endswith(":user/admin") and me["Account"] == "000000000000", me
    assert aws_svc("sts", "get-caller-identity")["Arn"] == me["Arn"]
    # By id, by Name tag (the node's name), by tag, by state; with the AWS CLI and boto3.
    out = aws_svc("ec2", "describe-instances", "--instance-ids", WEB1)
    insts = [i for r in out["Reservations"] for i in r["Instances"]]
    assert [i["InstanceId"] for i in insts] == [WEB1] and insts[0]["State"]["Name"] == "running", out
    tags = {t["Key"]: t["Value"] for t in insts[0]["Tags"]}
    assert tags["Name"] == "web-1" and tags["role"] == "web", tags
    by_name = EC2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["web-*"]}])
    assert sorted(i["InstanceId"] for r in by_name["Reservations"] for i in r["Instances"]) == sorted([WEB1, WEB2]), by_name
    ip = insts[0].get("PrivateIpAddress")
    if ip:
        by_ip = aws_svc("ec2", "describe-instances", "--filters", f"Name=private-ip-address,Values={ip}")
        assert WEB1 in [i["InstanceId"] for r in by_ip["Reservations"] for i in r["Instances"]], by_ip
    none = EC2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["stopped"]}, {"Name": "tag-key", "Values": ["role"]}])
    assert none["Reservations"] == [], none
    pages = list(EC2.get_paginator("describe_instances").paginate(PaginationConfig={"PageSize": 5}))
    assert {i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]} >= {WEB1, WEB2, DB1}, pages
    # Tag with ec2 create-tags, then a send by that tag reaches it; delete-tags takes it off.
    aws_svc("ec2", "create-tags", "--resources", DB1, "--tags", "Key=Environment,Value=Staging")
    cid = SSM.send_command(Targets=[{"Key": "tag:Environment", "Values": ["Staging"]}], **shell(["echo staged"]))["Command"]["CommandId"]
    assert wait_status(cid, DB1, {"Success", "Failed"})["StandardOutputContent"] == "staged\n"
    described = EC2.describe_tags(Filters=[{"Name": "resource-id", "Values": [DB1]}, {"Name": "key", "Values": ["Environment"]}])["Tags"]
    assert described == [{"ResourceId": DB1, "ResourceType": "instance", "Key": "Environment", "Value": "Staging"}], described
    EC2.delete_tags(Resources=[DB1], Tags=[{"Key": "Environment", "Value": "Other"}])  # the value differs: kept
    assert EC2.describe_tags(Filters=[{"Name": "key", "Values": ["Environment"]}])["Tags"] != []
    EC2.delete_tags(Resources=[DB1], Tags=[{"Key": "Environment"}])
    assert EC2.describe_tags(Filters=[{"Name": "key", "Values": ["Environment"]}])["Tags"] == []
    assert EC2.describe_vpcs()["Vpcs"] == [] and EC2.describe_subnets()["Subnets"] == []
    # Errors by EC2's names; nothing else of EC2 is served.
    for fn, kw, expected in [
        (EC2.describe_instances, dict(InstanceIds=["mi-0123456789abcdef0"]), "InvalidInstanceID.NotFound"),
        (EC2.describe_instances, dict(InstanceIds=["i-bogus"]), "InvalidInstanceID.Malformed"),
        (EC2.describe_instances, dict(Filters=[{"Name": "vpc-id", "Values": ["x"]}]), "InvalidParameterValue"),
        (EC2.run_instances, dict(ImageId="ami-12345678", MinCount=1, MaxCount=1), "UnsupportedOperation"),
        (EC2.create_tags, dict(Resources=[DB1], Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(60)]), "TagLimitExceeded"),
    ]:
        code, msg = error_code(fn, **kw)
        assert code == expected, (code, msg, kw)
    team = query_client("ec2", aws_access_key_id=os.environ["TEAM_KEY_ID"], aws_secret_access_key=os.environ["TEAM_SECRET"])
    seen = {i["InstanceId"] for r in team.describe_instances()["Reservations"] for i in r["Instances"]}
    assert seen == {WEB1, WEB2}, seen
    assert error_code(team.create_tags, Resources=[DB1], Tags=[{"Key": "a", "Value": "b"}])[0] == "UnauthorizedOperation"
    bad = query_client("sts", aws_access_key_id=KEY_ID, aws_secret_access_key="wrong-secret")
    assert error_code(bad.get_caller_identity)[0] == "SignatureDoesNotMatch"


@scenario
def an_activation_registers_an_agent_that_is_then_deregistered():
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    act = SSM.create_activation(IamRole="SSMServiceRole", RegistrationLimit=1, DefaultInstanceName="edge-box",
                                Description="edge", ExpirationDate=expires,
                                Tags=[{"Key": "site", "Value": "lab"}])
    aid, code = act["ActivationId"], act["ActivationCode"]
    listed = SSM.describe_activations(Filters=[{"FilterKey": "ActivationIds", "FilterValues": [aid]}])["ActivationList"]
    assert len(listed) == 1 and listed[0]["RegistrationLimit"] == 1 and listed[0]["RegistrationsCount"] == 0, listed
    assert listed[0]["DefaultInstanceName"] == "edge-box" and listed[0]["IamRole"] == "SSMServiceRole" and not listed[0]["Expired"], listed
    assert {"Key": "site", "Value": "lab"} in listed[0]["Tags"], listed
    assert abs(listed[0]["ExpirationDate"].timestamp() - expires.timestamp()) < 5, listed
    # An agent registers with the id and code, as the SSM agent's -register takes them.
    state = os.path.join(SCRATCH, "activation-agent")
    agent = subprocess.Popen([os.environ["FLEETRUN_AGENT"], "--server", ENDPOINT, "--state-dir", state,
                              "--activation-id", aid, "--activation-code", code, "--ca-cert", os.environ["AWS_CA_BUNDLE"], "--no-imds"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def registered():
            infos = SSM.describe_instance_information(Filters=[{"Key": "ActivationIds", "Values": [aid]}])["InstanceInformationList"]
            return [i for i in infos if i["PingStatus"] == "Online"]
        infos = wait_for("the activated agent online", registered)
        node = infos[0]["InstanceId"]
        assert infos[0]["Name"] == "edge-box", infos
        tags = SSM.list_tags_for_resource(ResourceType="ManagedInstance", ResourceId=node)["TagList"]
        assert {"Key": "site", "Value": "lab"} in tags, tags
        assert SSM.describe_activations(Filters=[{"FilterKey": "ActivationIds", "FilterValues": [aid]}])["ActivationList"][0]["RegistrationsCount"] == 1
        cid = SSM.send_command(InstanceIds=[node], **shell(["echo activated"]))["Command"]["CommandId"]
        assert wait_status(cid, node, {"Success", "Failed"})["StandardOutputContent"] == "activated\n"
        # Deregistered: it leaves the fleet and its agent stops.
        SSM.deregister_managed_instance(InstanceId=node)
        agent.wait(timeout=30)
        gone = SSM.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [node]}])["InstanceInformationList"]
        assert gone == [], gone
        assert error_code(SSM.deregister_managed_instance, InstanceId=node)[0] == "InvalidInstanceId"
    finally:
        if agent.poll() is None:
            agent.kill()
    SSM.delete_activation(ActivationId=aid)
    assert SSM.describe_activations(Filters=[{"FilterKey": "ActivationIds", "FilterValues": [aid]}])["ActivationList"] == []
    assert error_code(SSM.delete_activation, ActivationId=aid)[0] == "InvalidActivationId"
    for kw in [dict(IamRole="r", RegistrationLimit=5000), dict(IamRole="r", ExpirationDate=datetime.datetime(2001, 1, 1)),
               dict(IamRole="r", Tags=[{"Key": "", "Value": "x"}])]:
        code_, msg = error_code(LOOSE.create_activation, **kw)
        assert code_ in ("InvalidParameters", "ValidationException"), (code_, msg, kw)
    assert error_code(LOOSE.describe_activations, Filters=[{"FilterKey": "Colour", "FilterValues": ["x"]}])[0] == "InvalidFilter"


@scenario
def document_errors():
    steps = lambda action, **pre: [{"action": action, "name": "s", **pre, "inputs": {"runCommand": ["true"]}}]
    bad_content = [
        "{not json",
        json.dumps({"schemaVersion": "2.2", "mainSteps": steps("aws:runPowerShellScript")}),
        json.dumps({"schemaVersion": "2.2", "mainSteps": [{"action": "aws:runShellScript", "name": "s", "inputs": {"runCommand": ["echo {{ undefined }}"]}}]}),
        json.dumps({"schemaVersion": "2.2", "parameters": {"p": {"type": "Float"}}, "mainSteps": steps("aws:runShellScript")}),
    ]
    cases = [("InvalidDocumentContent", LOOSE.create_document, dict(Name=f"Bad-{i}-{uuid.uuid4().hex[:6]}", Content=c)) for i, c in enumerate(bad_content)]
    good = json.dumps({"schemaVersion": "2.2", "mainSteps": steps("aws:runShellScript")})
    big = json.dumps({"schemaVersion": "2.2", "description": "x" * 70000, "mainSteps": steps("aws:runShellScript")})
    cases += [
        ("InvalidDocumentContent", LOOSE.create_document, dict(Name="Yaml-Doc", Content="schemaVersion: '2.2'", DocumentFormat="YAML")),
        ("MaxDocumentSizeExceeded", LOOSE.create_document, dict(Name="Big-Doc", Content=big)),
        ("ValidationException", LOOSE.create_document, dict(Name="AWS-Mine", Content=good)),
        ("DocumentAlreadyExists", LOOSE.create_document, dict(Name=DOC_NAME, Content=good)),
        ("InvalidDocumentOperation", LOOSE.delete_document, dict(Name="AWS-RunShellScript")),
        ("InvalidDocumentOperation", LOOSE.update_document, dict(Name="AWS-RunShellScript", Content=good, DocumentVersion="$LATEST")),
        ("InvalidDocument", LOOSE.describe_document, dict(Name="No-Such-Document")),
        ("InvalidDocument", LOOSE.delete_document, dict(Name="No-Such-Document")),
        ("InvalidDocumentVersion", LOOSE.get_document, dict(Name=DOC_NAME, DocumentVersion="9")),
        ("InvalidDocumentVersion", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName=DOC_NAME, DocumentVersion="9", Parameters={"names": ["a"]})),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={})),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={"names": ["a"], "bogus": ["1"]})),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={"names": ["a"], "mode": ["medium"]})),
        ("InvalidParameters", LOOSE.send_command, dict(InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={"names": ["a"], "greeting": ["Hi There"]})),
        ("InvalidFilterKey", LOOSE.list_documents, dict(Filters=[{"Key": "Bogus", "Values": ["x"]}])),
    ]
    wrong = []
    for want, fn, kw in cases:
        got, msg = error_code(fn, **kw)
        if got != want:
            wrong.append(f"{fn.__name__}({str(kw)[:120]}): want {want}, got {got} ({msg})")
        elif not msg:
            wrong.append(f"{fn.__name__}: {got} without a message")
    assert not wrong, "\n".join(wrong)
    code, msg = error_code(LOOSE.send_command, InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={"names": ["a"], "mode": ["medium"]})
    assert '"mode"' in msg, msg
    # Deleted: sends of it are refused, and it is gone from listings.
    SSM.delete_document(Name=DOC_NAME)
    assert error_code(LOOSE.send_command, InstanceIds=[WEB1], DocumentName=DOC_NAME, Parameters={"names": ["a"]})[0] == "InvalidDocument"
    assert DOC_NAME not in [i["Name"] for i in SSM.list_documents()["DocumentIdentifiers"]]


# ---- Parameter Store ------------------------------------------------------------------------------

PS_ROOT = f"/fr-test-{uuid.uuid4().hex[:8]}"


def aws_fails(*args):
    """Runs the AWS CLI expecting a failure; returns its stderr."""
    p = aws(*args, check=False)
    assert p.returncode != 0, f"{' '.join(args)} succeeded: {p.stdout}"
    return p.stderr


def native_get(path):
    req = urllib.request.Request(ENDPOINT + path, headers={"Authorization": "Bearer " + TOKEN})
    return http(req)


def native_put(path, body):
    req = urllib.request.Request(ENDPOINT + path, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
    return http(req)


@scenario
def a_secure_string_put_with_the_aws_cli_reaches_a_command_and_nothing_else():
    name, secret = f"{PS_ROOT}/db/pass", "s3cr3t-" + uuid.uuid4().hex
    out = aws("put-parameter", "--name", name, "--type", "SecureString", "--value", secret, "--description", "the db password")
    assert out == {"Version": 1, "Tier": "Standard"}, out
    p = aws("get-parameter", "--name", name, check=False)
    assert p.returncode == 0 and secret not in p.stdout, p.stdout
    shown = json.loads(p.stdout)["Parameter"]
    assert shown["Type"] == "SecureString" and shown["Version"] == 1 and shown["Value"] and shown["Value"] != secret, shown
    clear = aws("get-parameter", "--name", name, "--with-decryption")["Parameter"]
    assert clear["Value"] == secret, clear
    # The runbook's send: the node gets the value, the output served back never shows it.
    digest = hashlib.sha256(secret.encode()).hexdigest()
    cmd = aws("send-command", "--instance-ids", WEB1, "--document-name", "AWS-RunShellScript",
              "--parameters", json.dumps({"commands": [f"printf %s '{{{{ssm-secure:{name}}}}}' | sha256sum | cut -c1-64",
                                                       f"echo 'raw={{{{ssm-secure:{name}}}}}'"]}))["Command"]
    assert secret not in json.dumps(cmd), cmd
    aws("wait", "command-executed", "--command-id", cmd["CommandId"], "--instance-id", WEB1)
    inv = aws("get-command-invocation", "--command-id", cmd["CommandId"], "--instance-id", WEB1)
    assert inv["StandardOutputContent"] == f"{digest}\nraw=****\n", inv["StandardOutputContent"]
    # Versions: a second put needs --overwrite; the first value stays in the history.
    assert "ParameterAlreadyExists" in aws_fails("put-parameter", "--name", name, "--type", "SecureString", "--value", "x")
    second = secret + "-2"
    assert aws("put-parameter", "--name", name, "--value", second, "--overwrite")["Version"] == 2
    now = SSM.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert now["Value"] == second and now["Type"] == "SecureString" and now["Version"] == 2, now
    old = SSM.get_parameter(Name=f"{name}:1", WithDecryption=True)["Parameter"]
    assert old["Value"] == secret and old["Version"] == 1 and old["Selector"] == ":1", old
    history = aws("get-parameter-history", "--name", name, "--with-decryption")["Parameters"]
    assert [(h["Version"], h["Value"]) for h in history] == [(1, secret), (2, second)], history
    assert all(h["Description"] == "the db password" and h["KeyId"] == "alias/aws/ssm" for h in history), history
    sealed = SSM.get_parameter_history(Name=name)["Parameters"]
    assert all(h["Value"] not in (secret, second) for h in sealed), sealed
    # The same parameter on the native API: secure, version 2, no value.
    status, native = native_get("/v1/params/" + urllib.parse.quote(name, safe=""))
    assert status == 200 and native["secure"] and native["version"] == 2 and "value" not in native, native
    # A plain String and a StringList resolve through {{ssm:NAME}} as well.
    SSM.put_parameter(Name=f"{PS_ROOT}/region", Value="eu-west-3", Type="String")
    SSM.put_parameter(Name=f"{PS_ROOT}/zones", Value="a,b,c", Type="StringList")
    cid = SSM.send_command(InstanceIds=[WEB2], **shell([f"echo {{{{ssm:{PS_ROOT}/region}}}} {{{{ssm:{PS_ROOT}/zones}}}}"]))["Command"]["CommandId"]
    inv = wait_status(cid, WEB2, {"Success", "Failed"})
    assert inv["StandardOutputContent"] == "eu-west-3 a,b,c\n", inv
    got = SSM.get_parameters(Names=[f"{PS_ROOT}/region", f"{PS_ROOT}/zones", f"{PS_ROOT}/nope", f"{PS_ROOT}/region"])
    assert [(p["Name"], p["Type"], p["Value"]) for p in got["Parameters"]] == [
        (f"{PS_ROOT}/region", "String", "eu-west-3"), (f"{PS_ROOT}/zones", "StringList", "a,b,c")], got
    assert got["InvalidParameters"] == [f"{PS_ROOT}/nope"], got
    # A plain put on the native API (which knows only plain and secure) keeps a StringList a StringList.
    status, put = native_put("/v1/params/" + urllib.parse.quote(f"{PS_ROOT}/zones", safe=""), {"value": "d,e"})
    assert status == 200 and put["version"] == 2 and put["value"] == "d,e", (status, put)
    zones = SSM.get_parameter(Name=f"{PS_ROOT}/zones")["Parameter"]
    assert (zones["Type"], zones["Value"], zones["Version"]) == ("StringList", "d,e", 2), zones
    # The audit trail has the puts, never the values.
    status, puts = native_get("/v1/audit?action=ssm.PutParameter&limit=10000")
    assert status == 200, puts
    assert sum(1 for r in puts if name in json.dumps(r)) >= 3, puts[-5:]
    assert secret not in json.dumps(puts) and second not in json.dumps(puts)


@scenario
def parameters_by_path_and_described_come_in_pages():
    root = f"{PS_ROOT}/pages"
    names = {"a": [f"{root}/a/x{i:02}" for i in range(12)], "sub": [f"{root}/a/sub/y{i}" for i in range(6)],
             "b": [f"{root}/b/z{i}" for i in range(5)]}
    for n in names["a"]:
        SSM.put_parameter(Name=n, Value="v-" + n[-3:], Type="String")
    for n in names["sub"]:
        SSM.put_parameter(Name=n, Value="1,2", Type="StringList", AllowedPattern="^[0-9,]+$")
    for n in names["b"]:
        SSM.put_parameter(Name=n, Value="secret-" + n[-2:], Type="SecureString", KeyId="alias/aws/ssm")

    def by_path(**kw):
        pages = list(SSM.get_paginator("get_parameters_by_path").paginate(**kw))
        return [p for page in pages for p in page["Parameters"]], len(pages)

    one, pages = by_path(Path=f"{root}/a", PaginationConfig={"PageSize": 5})
    assert sorted(p["Name"] for p in one) == names["a"] and pages >= 3, (len(one), pages)
    every, _ = by_path(Path=f"{root}/a/", Recursive=True, PaginationConfig={"PageSize": 4})
    assert sorted(p["Name"] for p in every) == sorted(names["a"] + names["sub"]), every
    lists, _ = by_path(Path=root, Recursive=True, ParameterFilters=[{"Key": "Type", "Values": ["StringList"]}])
    assert sorted(p["Name"] for p in lists) == names["sub"], lists
    secure, _ = by_path(Path=f"{root}/b", WithDecryption=True)
    assert sorted(p["Value"] for p in secure) == sorted("secret-" + n[-2:] for n in names["b"]), secure
    sealed, _ = by_path(Path=f"{root}/b")
    assert all(p["Value"].startswith("secret-") is False for p in sealed), sealed
    cli = aws("get-parameters-by-path", "--path", root, "--recursive")["Parameters"]  # the CLI pages by itself
    assert len(cli) == 23 and len({p["Name"] for p in cli}) == 23, len(cli)

    def described(**kw):
        return [p for page in SSM.get_paginator("describe_parameters").paginate(**kw) for p in page["Parameters"]]

    under = described(ParameterFilters=[{"Key": "Path", "Option": "Recursive", "Values": [root]}], PaginationConfig={"PageSize": 7})
    assert sorted(p["Name"] for p in under) == sorted(sum(names.values(), [])), len(under)
    subs = {p["Name"]: p for p in under if p["Type"] == "StringList"}
    assert all(p["AllowedPattern"] == "^[0-9,]+$" and p["Tier"] == "Standard" for p in subs.values()), subs
    level = described(ParameterFilters=[{"Key": "Path", "Values": [f"{root}/b"]}, {"Key": "KeyId", "Values": ["alias/aws/ssm"]}])
    assert sorted(p["Name"] for p in level) == names["b"] and all(p["KeyId"] == "alias/aws/ssm" for p in level), level
    begins = described(ParameterFilters=[{"Key": "Name", "Option": "BeginsWith", "Values": [f"{root}/a/sub/"]}])
    assert sorted(p["Name"] for p in begins) == names["sub"], begins
    legacy = described(Filters=[{"Key": "Name", "Values": [f"{root}/b/"]}, {"Key": "Type", "Values": ["SecureString"]}])
    assert sorted(p["Name"] for p in legacy) == names["b"], legacy
    assert described(ParameterFilters=[{"Key": "tag:team", "Values": ["x"]}]) == []  # parameters carry no tags
    cli = aws("describe-parameters", "--parameter-filters", f"Key=Path,Option=Recursive,Values={root}")["Parameters"]
    assert len(cli) == 23, len(cli)
    # DeleteParameters answers what it deleted and what it could not.
    gone = SSM.delete_parameters(Names=names["b"][:2] + [f"{root}/b/none"])
    assert sorted(gone["DeletedParameters"]) == names["b"][:2] and gone["InvalidParameters"] == [f"{root}/b/none"], gone
    SSM.delete_parameter(Name=names["b"][2])
    left, _ = by_path(Path=f"{root}/b")
    assert sorted(p["Name"] for p in left) == names["b"][3:], left
    # A deleted parameter starts again at version 1.
    assert SSM.put_parameter(Name=names["b"][0], Value="again", Type="String")["Version"] == 1


@scenario
def parameter_store_errors_and_hostile_inputs():
    name = f"{PS_ROOT}/errors/p"
    SSM.put_parameter(Name=name, Value="123", Type="String", AllowedPattern=r"^\d+$")
    cases = [
        ("ParameterNotFound", LOOSE.get_parameter, dict(Name=f"{PS_ROOT}/errors/none")),
        ("ParameterNotFound", LOOSE.delete_parameter, dict(Name=f"{PS_ROOT}/errors/none")),
        ("ParameterNotFound", LOOSE.get_parameter_history, dict(Name=f"{PS_ROOT}/errors/none")),
        ("ParameterAlreadyExists", LOOSE.put_parameter, dict(Name=name, Value="1", Type="String")),
        ("ParameterVersionNotFound", LOOSE.get_parameter, dict(Name=f"{name}:9")),
        ("ParameterVersionNotFound", LOOSE.get_parameter, dict(Name=f"{name}:some-label")),
        ("InvalidKeyId", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/k", Value="v", Type="SecureString", KeyId="alias/mine")),
        ("ParameterPatternMismatchException", LOOSE.put_parameter, dict(Name=name, Value="abc", Overwrite=True)),
        ("ParameterPatternMismatchException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/q", Value="x", Type="String", AllowedPattern="^y$")),
        ("InvalidAllowedPatternException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/r", Value="x", Type="String", AllowedPattern="(")),
        ("HierarchyLevelLimitExceededException", LOOSE.put_parameter, dict(Name="/l" * 16, Value="x", Type="String")),
        ("ValidationException", LOOSE.put_parameter, dict(Name="/" + "n" * 1100, Value="x", Type="String")),
        ("ValidationException", LOOSE.get_parameter, dict(Name="/" + "n" * 3000)),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/t", Value="x", Type="Bogus")),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/new", Value="x")),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/big", Value="x" * 5000, Type="String")),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/empty", Value="", Type="String")),
        ("ValidationException", LOOSE.put_parameter, dict(Name="/aws/mine", Value="x", Type="String")),
        ("ValidationException", LOOSE.put_parameter, dict(Name="no/leading/slash", Value="x", Type="String")),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/adv", Value="x", Type="String", Tier="Advanced")),
        ("ValidationException", LOOSE.put_parameter, dict(Name=f"{PS_ROOT}/errors/kid", Value="x", Type="String", KeyId="alias/aws/ssm")),
        ("ValidationException", LOOSE.get_parameters, dict(Names=[f"/n{i}" for i in range(11)])),
        ("ValidationException", LOOSE.delete_parameters, dict(Names=[f"/n{i}" for i in range(11)])),
        ("ValidationException", LOOSE.get_parameters_by_path, dict(Path=PS_ROOT, MaxResults=11)),
        ("ValidationException", LOOSE.get_parameters_by_path, dict(Path="relative")),
        ("ValidationException", LOOSE.describe_parameters, dict(MaxResults=51)),
        ("InvalidFilterKey", LOOSE.get_parameters_by_path, dict(Path=PS_ROOT, ParameterFilters=[{"Key": "Name", "Values": ["x"]}])),
        ("InvalidFilterKey", LOOSE.describe_parameters, dict(ParameterFilters=[{"Key": "Bogus", "Values": ["x"]}])),
        ("InvalidFilterOption", LOOSE.describe_parameters, dict(ParameterFilters=[{"Key": "Type", "Option": "BeginsWith", "Values": ["String"]}])),
        ("InvalidFilterValue", LOOSE.describe_parameters, dict(ParameterFilters=[{"Key": "Type", "Values": ["Float"]}])),
        ("InvalidFilterValue", LOOSE.describe_parameters, dict(ParameterFilters=[{"Key": "Name", "Values": ["x"] * 51}])),
        ("InvalidNextToken", LOOSE.describe_parameters, dict(NextToken="not-a-token")),
        ("InvalidNextToken", LOOSE.get_parameters_by_path, dict(Path=PS_ROOT, NextToken="frp.zz")),
        ("InvalidNextToken", LOOSE.get_parameter_history, dict(Name=name, NextToken="frv.-1")),
    ]
    wrong = []
    for want, fn, kw in cases:
        got, msg = error_code(fn, **kw)
        if got != want:
            wrong.append(f"{fn.__name__}({str(kw)[:100]}): want {want}, got {got} ({msg})")
        elif not msg:
            wrong.append(f"{fn.__name__}: {got} without a message")
    assert not wrong, "\n".join(wrong)
    # The pattern stays with the parameter: a matching overwrite passes.
    assert SSM.put_parameter(Name=name, Value="456", Overwrite=True)["Version"] == 2
    # Members of the wrong JSON type, and a body that is not JSON: a 400 naming the problem, never a 500.
    now = datetime.datetime.now(datetime.timezone.utc)
    for op, payload in [("PutParameter", {"Name": f"{PS_ROOT}/errors/num", "Value": 5, "Type": "String"}),
                        ("GetParameters", {"Names": "not-a-list"}),
                        ("GetParametersByPath", {"Path": PS_ROOT, "MaxResults": "ten"}),
                        ("DescribeParameters", {"ParameterFilters": [{"Values": ["x"]}]})]:
        status, body = signed_post(op, payload, now)
        assert status == 400 and body.get("__type") and body.get("message"), (op, status, body)


@scenario
def a_viewer_reads_parameters_but_no_secret_and_puts_nothing():
    viewer = client(aws_access_key_id=os.environ["VIEWER_KEY_ID"], aws_secret_access_key=os.environ["VIEWER_SECRET"])
    name, secret = f"{PS_ROOT}/viewer/s", "viewer-" + uuid.uuid4().hex
    SSM.put_parameter(Name=name, Value=secret, Type="SecureString")
    seen = viewer.get_parameter(Name=name)["Parameter"]
    assert seen["Type"] == "SecureString" and seen["Value"] != secret, seen
    for fn, kw in [
        (viewer.get_parameter, {"Name": name, "WithDecryption": True}),
        (viewer.get_parameters, {"Names": [name], "WithDecryption": True}),
        (viewer.get_parameters_by_path, {"Path": f"{PS_ROOT}/viewer", "WithDecryption": True}),
        (viewer.get_parameter_history, {"Name": name, "WithDecryption": True}),
        (viewer.put_parameter, {"Name": f"{PS_ROOT}/viewer/new", "Value": "x", "Type": "String"}),
        (viewer.delete_parameter, {"Name": name}),
        (viewer.delete_parameters, {"Names": [name]}),
    ]:
        code, msg = error_code(fn, **kw)
        assert code == "AccessDeniedException", (fn.__name__, code, msg)
    assert [p["Name"] for p in viewer.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [name]}])["Parameters"]] == [name]


# ---- What SSM clients rely on around commands --------------------------------------------------------


@scenario
def a_sent_command_is_visible_at_once_and_cancelling_a_finished_one_is_no_error():
    for _ in range(5):
        cid = SSM.send_command(InstanceIds=[WEB1, DB1], **shell(["echo seen"]))["Command"]["CommandId"]
        # No wait: both calls see the command the moment SendCommand returned.
        assert invocation(cid, WEB1)["Status"] in ("Pending", "InProgress", "Success"), cid
        listed = {i["InstanceId"] for i in SSM.list_command_invocations(CommandId=cid)["CommandInvocations"]}
        assert listed == {WEB1, DB1}, listed
    for node in (WEB1, DB1):
        assert wait_status(cid, node, {"Success", "Failed"})["Status"] == "Success"
    SSM.cancel_command(CommandId=cid)  # a finished command: no error
    aws("cancel-command", "--command-id", cid, "--instance-ids", WEB1)
    assert invocation(cid, WEB1)["Status"] == "Success", "cancelling a finished command changed it"
    # Where SSM answers InvalidInstanceId and InvocationDoesNotExist.
    code, msg = error_code(LOOSE.cancel_command, CommandId=cid, InstanceIds=[WEB2])
    assert code == "InvalidInstanceId" and WEB2 in msg, (code, msg)
    code, _ = error_code(LOOSE.send_command, InstanceIds=["mi-0123456789abcdef0"], **shell(["true"]))
    assert code == "InvalidInstanceId", code
    code, _ = error_code(LOOSE.get_command_invocation, CommandId=cid, InstanceId=WEB2)
    assert code == "InvocationDoesNotExist", code
    code, _ = error_code(LOOSE.get_command_invocation, CommandId=cid, InstanceId="mi-0123456789abcdef0")
    assert code == "InvocationDoesNotExist", code
    assert SSM.list_command_invocations(CommandId=cid, InstanceId=WEB2)["CommandInvocations"] == []


@scenario
def the_listings_without_a_paging_test_page_with_their_paginators():
    """ListCommandInvocations, DescribeActivations, GetParameterHistory and EC2 DescribeTags: more
    items than a page, each seen exactly once, in more than one page."""
    def paged(client, op, key, size, **kw):
        pages = list(client.get_paginator(op).paginate(PaginationConfig={"PageSize": size}, **kw))
        return [item for p in pages for item in p[key]], len(pages)

    cid = SSM.send_command(InstanceIds=[WEB1, WEB2, DB1], **shell(["true"]))["Command"]["CommandId"]
    for details in (False, True):
        invs, pages = paged(SSM, "list_command_invocations", "CommandInvocations", 1, CommandId=cid, Details=details)
        assert sorted(i["InstanceId"] for i in invs) == sorted([WEB1, WEB2, DB1]) and pages == 3, (invs, pages)
    role = f"PagedRole-{uuid.uuid4().hex[:8]}"
    made = {SSM.create_activation(IamRole=role, Description=f"page {i}")["ActivationId"] for i in range(7)}
    acts, pages = paged(SSM, "describe_activations", "ActivationList", 2, Filters=[{"FilterKey": "IamRole", "FilterValues": [role]}])
    ids = [a["ActivationId"] for a in acts]
    assert sorted(ids) == sorted(made) and pages == 4, (ids, pages)
    for a in made:
        SSM.delete_activation(ActivationId=a)
    name = f"{PS_ROOT}/paged-history"
    for v in range(7):
        SSM.put_parameter(Name=name, Value=f"v{v}", Type="String", Overwrite=v > 0)
    hist, pages = paged(SSM, "get_parameter_history", "Parameters", 2, Name=name)
    assert [(h["Version"], h["Value"]) for h in hist] == [(v + 1, f"v{v}") for v in range(7)] and pages == 4, (hist, pages)
    EC2.create_tags(Resources=[DB1], Tags=[{"Key": f"Page{i}", "Value": str(i)} for i in range(7)])
    tags, pages = paged(EC2, "describe_tags", "Tags", 5, Filters=[{"Name": "resource-id", "Values": [DB1]}, {"Name": "key", "Values": ["Page*"]}])
    assert [t["Key"] for t in tags] == [f"Page{i}" for i in range(7)] and pages == 2, (tags, pages)
    every = EC2.describe_tags()["Tags"]
    tags, pages = paged(EC2, "describe_tags", "Tags", 5)
    assert tags == every and pages >= 3, (len(tags), len(every), pages)
    EC2.delete_tags(Resources=[DB1], Tags=[{"Key": f"Page{i}"} for i in range(7)])
    for kw, expected in [(dict(MaxResults=4), "InvalidParameterValue"), (dict(NextToken="bogus"), "InvalidNextToken.Malformed")]:
        code, msg = error_code(EC2.describe_tags, **kw)
        assert code == expected, (code, msg, kw)


@scenario
def hostile_query_bodies_get_the_query_xml_error_shape():
    """An oversize form body, too many or too long members, bytes that are no form: each a 4xx in
    the EC2 or STS XML error shape (checked by `xml_conformance`), never JSON, a 500 or a hang."""
    host = ENDPOINT.split("://", 1)[1]
    sts_scope = f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20260101/{REGION}/sts/aws4_request, SignedHeaders=host, Signature=" + "0" * 64
    cases = [
        ("ec2", "oversize", b"Action=DescribeInstances&Version=2016-11-15&Pad=" + b"a" * (3 * 1024 * 1024), {}),
        ("sts", "oversize", b"Action=GetCallerIdentity&Version=2011-06-15&Pad=" + b"a" * (3 * 1024 * 1024), {"Authorization": sts_scope}),
        ("ec2", "too many members", "&".join(["Action=DescribeInstances"] + [f"Filter.{i}.Name=tag-key" for i in range(2100)]).encode(), {}),
        ("ec2", "a long member", b"Action=DescribeInstances&InstanceId.1=i-" + b"0" * 5000, {}),
        ("ec2", "not a form", b"Action=%ff%fe%00\xff\xfe&&&==", {}),
    ]
    for service, what, body, extra in cases:
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Host": host, **extra}
        req = urllib.request.Request(ENDPOINT + "/", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            status, ctype, raw = e.code, e.headers.get("Content-Type", ""), e.read()
        assert 400 <= status < 500, (what, status, raw[:200])
        assert ctype.startswith("text/xml"), (what, ctype, raw[:200])
        RAW_XML.append((service, f"hostile {what}", status, raw))
        root = ET.fromstring(raw)
        assert xml_local(root.tag) == ("Response" if service == "ec2" else "ErrorResponse"), (what, raw[:200])
        message = root.find(".//{*}Message") if service == "sts" else root.find("./Errors/Error/Message")
        assert message is not None and message.text, (what, raw[:200])
        if what == "oversize":
            assert "larger than 2097152 bytes" in message.text, message.text


# ---- The seed runbook flows, with AWS CLI v1 and v2 -------------------------------------------------


def cli(path, service, *args, check=True):
    """Runs one AWS CLI (`path`) for `service`; parsed JSON, or the CompletedProcess when not `check`."""
    cmd = [path, "--endpoint-url", ENDPOINT, "--output", "json", service, *args]
    # v2 pages its output through `less` unless told not to.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, AWS_PAGER=""))
    if not check:
        return p
    if p.returncode != 0:
        raise AssertionError(f"{path} {service} {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return json.loads(p.stdout) if p.stdout.strip() else None


def runbook_flows(path, label, node, shell_node):
    """What set-up guides and runbooks do with the AWS CLI, through the CLI at `path` only (boto3
    just waits for events). `node` takes the sends; `shell_node` the shell session."""
    ssm = lambda *a, **kw: cli(path, "ssm", *a, **kw)  # noqa: E731
    mark = f"{label}-{uuid.uuid4().hex[:8]}"
    # 1. put-parameter SecureString, then a send that uses {{ssm-secure:NAME}}; the output masks it.
    name, secret = f"{PS_ROOT}/runbook/{mark}", "pw-" + uuid.uuid4().hex
    assert ssm("put-parameter", "--name", name, "--type", "SecureString", "--value", secret)["Version"] == 1
    cmd = ssm("send-command", "--instance-ids", node, "--document-name", "AWS-RunShellScript", "--comment", mark,
              "--parameters", json.dumps({"commands": [f"printf %s '{{{{ssm-secure:{name}}}}}' | sha256sum | cut -c1-64",
                                                       f"echo 'raw={{{{ssm-secure:{name}}}}}'"]}))["Command"]
    assert secret not in json.dumps(cmd), cmd
    ssm("wait", "command-executed", "--command-id", cmd["CommandId"], "--instance-id", node)
    inv = ssm("get-command-invocation", "--command-id", cmd["CommandId"], "--instance-id", node)
    assert inv["StandardOutputContent"] == hashlib.sha256(secret.encode()).hexdigest() + "\nraw=****\n", inv
    # 2. add-tags-to-resource, then a send by the new tag reaches that node alone.
    # (The CLI runs the runbook's steps; boto3 checks their effects, as CLI v2 starts slower.)
    ssm("add-tags-to-resource", "--resource-type", "ManagedInstance", "--resource-id", node, "--tags", f"Key=Runbook,Value={mark}")
    cmd = ssm("send-command", "--targets", f"Key=tag:Runbook,Values={mark}", "--document-name", "AWS-RunShellScript",
              "--parameters", 'commands=["echo tagged"]')["Command"]
    assert cmd["TargetCount"] == 1, cmd
    assert wait_status(cmd["CommandId"], node, {"Success", "Failed"})["StandardOutputContent"] == "tagged\n"
    SSM.remove_tags_from_resource(ResourceType="ManagedInstance", ResourceId=node, TagKeys=["Runbook"])
    # 3. A YAML 2.2 document created from a file and run.
    doc, yaml_file = f"Runbook-{mark}", os.path.join(SCRATCH, f"runbook-{mark}.yaml")
    with open(yaml_file, "w") as f:
        f.write(YAML_DOC)
    d = ssm("create-document", "--name", doc, "--document-type", "Command", "--document-format", "YAML",
            "--content", f"file://{yaml_file}")["DocumentDescription"]
    assert d["DocumentFormat"] == "YAML" and d["SchemaVersion"] == "2.2", d
    cmd = ssm("send-command", "--instance-ids", node, "--document-name", doc, "--parameters", f"word={label}")["Command"]
    out = wait_status(cmd["CommandId"], node, {"Success", "Failed"})["StandardOutputContent"]
    assert out.startswith(f"{label} on ") and out.endswith("\ndone\n"), out
    SSM.delete_document(Name=doc)
    # 4. describe-sessions lists an open shell; terminate-session ends it.
    env = dict(os.environ, FLEETRUN_SERVER=ENDPOINT, FLEETRUN_TOKEN=TOKEN, FLEETRUN_CA_CERT=os.environ["AWS_CA_BUNDLE"],
               FLEETRUN_CONFIG=os.path.join(SCRATCH, f"cli-{mark}.toml"))
    shell_proc = subprocess.Popen([os.environ["FLEETRUN_CLI"], "shell", shell_node, "-c", f"echo up; sleep 120 # {mark}"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert shell_proc.stdout.readline() == b"up\n"
        listed = ssm("describe-sessions", "--state", "Active", "--filters", f"key=Target,value={shell_node}")["Sessions"]
        mine = [x for x in listed if mark in x.get("Details", "")]
        assert len(mine) == 1 and mine[0]["Status"] == "Connected", listed
        assert ssm("terminate-session", "--session-id", mine[0]["SessionId"]) == {"SessionId": mine[0]["SessionId"]}
        shell_proc.wait(timeout=30)
    finally:
        if shell_proc.poll() is None:
            shell_proc.kill()
    # 5. EC2 lookups by private IP and by Name tag; ec2 create-tags, then a send by that tag.
    ec2 = lambda *a: cli(path, "ec2", *a)  # noqa: E731
    found = ec2("describe-instances", "--instance-ids", node)["Reservations"][0]["Instances"][0]
    ip, name_tag = found["PrivateIpAddress"], {t["Key"]: t["Value"] for t in found["Tags"]}["Name"]
    by_ip = [i for r in ec2("describe-instances", "--filters", f"Name=private-ip-address,Values={ip}")["Reservations"] for i in r["Instances"]]
    assert node in [i["InstanceId"] for i in by_ip] and all(i["PrivateIpAddress"] == ip for i in by_ip), by_ip
    by_name = [i["InstanceId"] for r in ec2("describe-instances", "--filters", f"Name=tag:Name,Values={name_tag}")["Reservations"] for i in r["Instances"]]
    assert by_name == [node], by_name
    ec2("create-tags", "--resources", node, "--tags", f"Key=Ec2Runbook,Value={mark}")
    cmd = ssm("send-command", "--targets", f"Key=tag:Ec2Runbook,Values={mark}", "--document-name", "AWS-RunShellScript",
              "--parameters", 'commands=["echo ec2-tagged"]')["Command"]
    assert cmd["TargetCount"] == 1, cmd
    assert wait_status(cmd["CommandId"], node, {"Success", "Failed"})["StandardOutputContent"] == "ec2-tagged\n"
    EC2.delete_tags(Resources=[node], Tags=[{"Key": "Ec2Runbook"}])
    # 6. sts get-caller-identity names the fleetrun user.
    me = cli(path, "sts", "get-caller-identity")
    assert me["Arn"].endswith(":user/admin") and me["Account"] == "000000000000", me
    # 7. create-activation, then an agent registers with it (and leaves again).
    act = ssm("create-activation", "--iam-role", "SSMServiceRole", "--registration-limit", "1",
              "--default-instance-name", f"act-{mark}", "--tags", f"Key=Runbook,Value={mark}")
    agent = subprocess.Popen([os.environ["FLEETRUN_AGENT"], "--server", ENDPOINT, "--state-dir", os.path.join(SCRATCH, f"agent-{mark}"),
                              "--activation-id", act["ActivationId"], "--activation-code", act["ActivationCode"],
                              "--ca-cert", os.environ["AWS_CA_BUNDLE"], "--no-imds"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def online():
            infos = SSM.describe_instance_information(Filters=[{"Key": "ActivationIds", "Values": [act["ActivationId"]]}])["InstanceInformationList"]
            return [i["InstanceId"] for i in infos if i["PingStatus"] == "Online"]
        new = wait_for(f"the agent of {mark}'s activation online", online)[0]
        listed = ssm("describe-instance-information", "--filters", f"Key=tag:Runbook,Values={mark}")["InstanceInformationList"]
        assert [(i["InstanceId"], i["Name"]) for i in listed] == [(new, f"act-{mark}")], listed
        ssm("deregister-managed-instance", "--instance-id", new)
        agent.wait(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    SSM.delete_activation(ActivationId=act["ActivationId"])


@scenario
def the_seed_runbook_flows_with_aws_cli_v1_and_v2():
    # Both CLIs at once, each on its own node and names: CLI v2 starts slower, and this halves the wait.
    import threading
    failures = []

    def run(path, label, node, shell_node):
        try:
            runbook_flows(path, label, node, shell_node)
        except BaseException:  # noqa: B036 - reported below, with the CLI's name
            failures.append(f"AWS CLI {label}:\n{traceback.format_exc()}")

    version = subprocess.run([AWS_V2, "--version"], capture_output=True, text=True).stdout
    assert version.startswith("aws-cli/2"), version
    threads = [threading.Thread(target=run, args=(AWS, "v1", WEB1, WEB1)),
               threading.Thread(target=run, args=(AWS_V2, "v2", DB1, DB1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a runbook flow did not end within 300 s"
    assert not failures, "\n".join(failures)


@scenario
def an_ec2_instance_registers_under_its_instance_id_and_is_reached_by_it():
    """An agent given an EC2 instance id (as IMDS would give it) is that instance to SSM and EC2."""
    instance = "i-0" + uuid.uuid4().hex[:16]
    act = SSM.create_activation(IamRole="SSMServiceRole", RegistrationLimit=1, DefaultInstanceName="ec2-box")
    state = os.path.join(SCRATCH, "ec2-agent-" + instance)
    agent = subprocess.Popen([os.environ["FLEETRUN_AGENT"], "--server", ENDPOINT, "--state-dir", state,
                              "--activation-code", act["ActivationCode"], "--instance-id", instance,
                              "--ca-cert", os.environ["AWS_CA_BUNDLE"], "--no-imds"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_for("the EC2 node online", lambda: [
            i for i in SSM.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance]}])["InstanceInformationList"]
            if i["PingStatus"] == "Online"])[0]
        assert info["ResourceType"] == "EC2Instance" and info["SourceType"] == "AWS::EC2::Instance", info
        assert info["Name"] == "ec2-box", info
        by_type = SSM.describe_instance_information(Filters=[{"Key": "ResourceType", "Values": ["EC2Instance"]}])["InstanceInformationList"]
        assert [i["InstanceId"] for i in by_type] == [instance], by_type
        found = aws_svc("ec2", "describe-instances", "--instance-ids", instance)
        insts = [i for r in found["Reservations"] for i in r["Instances"]]
        assert [(i["InstanceId"], i["State"]["Name"]) for i in insts] == [(instance, "running")], found
        by_filter = EC2.describe_instances(Filters=[{"Name": "instance-id", "Values": [instance]}])
        assert [i["InstanceId"] for r in by_filter["Reservations"] for i in r["Instances"]] == [instance], by_filter
        cmd = aws("send-command", "--instance-ids", instance, "--document-name", "AWS-RunShellScript",
                  "--parameters", 'commands=["echo I am $FLEETRUN_NODE_ID"]')["Command"]
        assert cmd["InstanceIds"] == [instance], cmd
        aws("wait", "command-executed", "--command-id", cmd["CommandId"], "--instance-id", instance)
        inv = SSM.get_command_invocation(CommandId=cmd["CommandId"], InstanceId=instance)
        assert inv["Status"] == "Success" and inv["StandardOutputContent"] == f"I am {instance}\n", inv
        # SSM deregisters managed instances only, and tags an EC2 instance through EC2.
        code, msg = error_code(LOOSE.deregister_managed_instance, InstanceId=instance)
        assert code == "InvalidInstanceId" and instance in msg, (code, msg)
        code, msg = error_code(LOOSE.add_tags_to_resource, ResourceType="ManagedInstance", ResourceId=instance, Tags=[{"Key": "a", "Value": "b"}])
        assert code == "InvalidResourceId" and "CreateTags" in msg, (code, msg)
        EC2.create_tags(Resources=[instance], Tags=[{"Key": "Fleet", "Value": "ec2"}])
        cid = SSM.send_command(Targets=[{"Key": "tag:Fleet", "Values": ["ec2"]}], **shell(["echo by tag"]))["Command"]["CommandId"]
        assert wait_status(cid, instance, {"Success", "Failed"})["StandardOutputContent"] == "by tag\n"
    finally:
        # The native API removes it (SSM's call refuses EC2 instances), so later listings are as before.
        req = urllib.request.Request(f"{ENDPOINT}/v1/nodes/{instance}", method="DELETE", headers={"Authorization": "Bearer " + TOKEN})
        status, _ = http(req)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
    assert status == 200, status


def conformance():
    """Checks every captured raw response against botocore's SSM model."""
    model = botocore.session.get_session().get_service_model("ssm")
    problems = []

    def check(shape, value, path):
        t = shape.type_name
        if t == "structure":
            if not isinstance(value, dict):
                return problems.append(f"{path}: {shape.name} should be an object")
            for k, v in value.items():
                if k not in shape.members:
                    problems.append(f"{path}: {k} is not a member of {shape.name}")
                else:
                    check(shape.members[k], v, f"{path}.{k}")
        elif t == "list":
            if not isinstance(value, list):
                return problems.append(f"{path}: should be a list")
            for i, v in enumerate(value):
                check(shape.member, v, f"{path}[{i}]")
        elif t == "map":
            if not isinstance(value, dict):
                return problems.append(f"{path}: should be a map")
            for k, v in value.items():
                check(shape.value, v, f"{path}[{k}]")
        elif t == "string":
            if not isinstance(value, str):
                return problems.append(f"{path}: should be a string, is {value!r}")
            enum, meta = shape.enum, shape.metadata
            if enum and value not in enum:
                problems.append(f"{path}: {value!r} is not one of {enum}")
            if "max" in meta and len(value) > meta["max"]:
                problems.append(f"{path}: longer than {meta['max']}")
            if value and "min" in meta and len(value) < meta["min"]:
                problems.append(f"{path}: shorter than {meta['min']}")
            pattern = meta.get("pattern")
            if value and pattern and shape.name != "StringDateTime":
                try:
                    rx = re.compile(pattern)
                except re.error:
                    rx = None
                if rx and not rx.search(value):
                    problems.append(f"{path}: {value!r} does not match {pattern}")
        elif t in ("integer", "long"):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{path}: should be an integer, is {value!r}")
        elif t == "boolean":
            if not isinstance(value, bool):
                problems.append(f"{path}: should be a boolean, is {value!r}")
        elif t in ("timestamp", "double", "float"):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"{path}: should be a number (epoch seconds), is {value!r}")

    ops = set()
    for op, raw in RAW_RESPONSES:
        ops.add(op)
        check(model.operation_model(op).output_shape, json.loads(raw or b"{}"), op)
    expected = {"SendCommand", "ListCommands", "ListCommandInvocations", "GetCommandInvocation", "CancelCommand", "DescribeInstanceInformation",
                "CreateDocument", "GetDocument", "DescribeDocument", "ListDocuments", "UpdateDocument", "DeleteDocument", "UpdateDocumentDefaultVersion",
                "ListDocumentVersions", "AddTagsToResource", "RemoveTagsFromResource", "ListTagsForResource",
                "DescribeSessions", "TerminateSession", "CreateActivation", "DescribeActivations", "DeleteActivation",
                "DeregisterManagedInstance",
                "PutParameter", "GetParameter", "GetParameters", "GetParametersByPath", "DeleteParameter", "DeleteParameters",
                "DescribeParameters", "GetParameterHistory"}
    if not os.environ.get("FLEETRUN_SSM_ONLY"):
        assert expected <= ops, f"not exercised: {expected - ops}"
    assert not problems, "\n".join(problems[:40])


SCENARIOS.append(conformance)


def xml_local(tag):
    return tag.split("}", 1)[-1]


def xml_conformance():
    """Checks every captured EC2 and STS answer against botocore's ec2 and sts models: the root
    element and namespace, each element a member of its shape (by its XML name), lists of the
    member's element name, scalars of the member's type; errors in the Query protocol's shapes."""
    from botocore.utils import parse_timestamp
    session = botocore.session.get_session()
    models = {svc: session.get_service_model(svc) for svc in ("ec2", "sts")}
    problems = []

    def check_scalar(shape, el, path):
        if len(el):
            return problems.append(f"{path}: {shape.name} is a {shape.type_name}, has elements {[xml_local(c.tag) for c in el][:3]}")
        text, t = el.text or "", shape.type_name
        try:
            if t == "string":
                if shape.enum and text not in shape.enum:
                    problems.append(f"{path}: {text!r} is not one of {shape.enum[:8]}")
                if "max" in shape.metadata and len(text) > shape.metadata["max"]:
                    problems.append(f"{path}: longer than {shape.metadata['max']}")
            elif t in ("integer", "long"):
                int(text)
            elif t == "boolean":
                if text not in ("true", "false"):
                    problems.append(f"{path}: {text!r} is not a boolean")
            elif t in ("double", "float"):
                float(text)
            elif t == "timestamp":
                parse_timestamp(text)
            elif t == "blob":
                import base64
                base64.b64decode(text, validate=True)
        except (ValueError, TypeError) as e:
            problems.append(f"{path}: {text!r} is not a {t} ({e})")

    def check(shape, el, path):
        t = shape.type_name
        if t == "structure":
            check_struct(shape, list(el), path)
        elif t == "list":
            item = shape.member.serialization.get("name", "member")
            for i, child in enumerate(el):
                if xml_local(child.tag) != item:
                    problems.append(f"{path}: list item <{xml_local(child.tag)}>, the model says <{item}>")
                check(shape.member, child, f"{path}[{i}]")
        elif t == "map":
            for child in el:
                names = [xml_local(c.tag) for c in child]
                if xml_local(child.tag) != "entry" or names != ["key", "value"]:
                    problems.append(f"{path}: map entry <{xml_local(child.tag)}> {names}")
        else:
            check_scalar(shape, el, path)

    def check_struct(shape, children, path, extra=()):
        by_name = {}
        for name, m in shape.members.items():
            if m.type_name == "list" and m.serialization.get("flattened"):
                by_name[m.member.serialization.get("name", name)] = (m, True)
            else:
                by_name[m.serialization.get("name", name)] = (m, False)
        seen = set()
        for child in children:
            name = xml_local(child.tag)
            if name in extra:
                continue
            if name not in by_name:
                problems.append(f"{path}: <{name}> is not a member of {shape.name}")
                continue
            member, flattened = by_name[name]
            if flattened:
                check(member.member, child, f"{path}.{name}")
                continue
            if name in seen:
                problems.append(f"{path}: <{name}> given twice")
            seen.add(name)
            check(member, child, f"{path}.{name}")

    # The checker itself finds what it should: an unknown element, a list item misnamed, a bad integer.
    bad = ET.fromstring("<r><reservationSet><member><bogus/></member></reservationSet><nextToken><x/></nextToken></r>")
    check_struct(models["ec2"].operation_model("DescribeInstances").output_shape, list(bad), "selftest")
    found, problems[:] = list(problems), []
    assert len(found) >= 3 and any("bogus" in f for f in found), found

    ops = {"ec2": set(), "sts": set()}
    errors = {"ec2": set(), "sts": set()}
    for service, op, status, raw in RAW_XML:
        where = f"{service}.{op} ({status})"
        try:
            root = ET.fromstring(raw)
        except ET.ParseError as e:
            problems.append(f"{where}: not XML ({e}): {raw[:80]!r}")
            continue
        model = models[service]
        if status == 200:
            ops[service].add(op)
            namespace = model.metadata.get("xmlNamespace")
            # EC2 answers with the model's namespace and a trailing slash.
            if root.tag.replace("/}", "}") != f"{{{namespace.rstrip('/')}}}{op}Response":
                problems.append(f"{where}: root <{root.tag}>, the model says <{op}Response xmlns={namespace!r}>")
            output = model.operation_model(op).output_shape
            if service == "ec2":
                # The ec2 protocol: the output's members right under the root, beside requestId.
                if output is not None:
                    check_struct(output, list(root), op, extra=("requestId",))
                if "requestId" not in [xml_local(c.tag) for c in root]:
                    problems.append(f"{where}: no requestId")
            else:
                # The query protocol: the members in the result wrapper, then ResponseMetadata.
                names = [xml_local(c.tag) for c in root]
                wrapper = output.serialization.get("resultWrapper") if output is not None else None
                if names != [wrapper, "ResponseMetadata"] or [xml_local(c.tag) for c in root[1]] != ["RequestId"]:
                    problems.append(f"{where}: children {names}, the model says [{wrapper!r}, 'ResponseMetadata/RequestId']")
                elif output is not None:
                    check_struct(output, list(root[0]), op)
        else:
            # EC2's error shape (Response/Errors/Error, RequestID); the query protocol's (ErrorResponse/Error, RequestId).
            if service == "ec2":
                errs = root.findall("./Errors/Error")
                shape_ok = xml_local(root.tag) == "Response" and [xml_local(c.tag) for c in root] == ["Errors", "RequestID"] and len(errs) == 1
                fields = ["Code", "Message"]
            else:
                errs = root.findall("./{*}Error")
                shape_ok = xml_local(root.tag) == "ErrorResponse" and [xml_local(c.tag) for c in root] == ["Error", "RequestId"] and len(errs) == 1
                fields = ["Type", "Code", "Message"]
            if not shape_ok or [xml_local(c.tag) for c in errs[0]] != fields or not all((c.text or "").strip() for c in errs[0]):
                problems.append(f"{where}: not the {service} error shape: {raw[:300]!r}")
                continue
            errors[service].add(errs[0][fields.index("Code")].text)
            if service == "sts" and errs[0][0].text not in ("Sender", "Receiver"):
                problems.append(f"{where}: error Type {errs[0][0].text!r}")
    if not os.environ.get("FLEETRUN_SSM_ONLY"):
        expected = {"ec2": {"DescribeInstances", "DescribeTags", "CreateTags", "DeleteTags", "DescribeVpcs", "DescribeSubnets"},
                    "sts": {"GetCallerIdentity"}}
        for svc in expected:
            assert expected[svc] <= ops[svc], f"{svc}: not exercised: {expected[svc] - ops[svc]}"
        assert errors["ec2"] and errors["sts"], f"no error answers checked: {errors}"
    assert not problems, "\n".join(problems[:40])


SCENARIOS.append(xml_conformance)


def main():
    passed = failed = 0
    # A developer's filter: only scenarios whose names hold one of these |-separated words.
    only = [w for w in os.environ.get("FLEETRUN_SSM_ONLY", "").split("|") if w]
    for fn in SCENARIOS:
        if only and not any(w in fn.__name__ for w in only) and fn not in (conformance, xml_conformance):
            continue
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"ok   {fn.__name__} ({time.time() - start:.1f} s)", flush=True)
        except (AssertionError, ClientError, WaiterError, Exception):  # noqa: B014 - report every failure
            failed += 1
            print(f"FAIL {fn.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
