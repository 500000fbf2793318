from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from .conftest import Upstream, raw_request, status_of

async def test_probe(gw: TestClient, upstream: Upstream) -> None:
    hits = []
    async def h(req):
        hits.append((req.raw_path, req.host))
        return web.Response(text="EVIL")
    app = web.Application(); app.router.add_route("*", "/{t:.*}", h)
    evil = TestServer(app, host="127.0.0.1"); await evil.start_server()
    p = evil.port
    out = []
    for t in [f"//127.0.0.1:{p}/x", f"http://127.0.0.1:{p}/x", f"http://127.0.0.1:{p}/members/x?y=1",
              "http://evil/members/x", "/members//evil.example", "/members/\\evil", "/members/x?y=//evil", f"//127.0.0.1:{p}/static/x"]:
        upstream.received.clear(); hits.clear()
        raw = await raw_request(gw.port, f"GET {t} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        loc = [l for l in raw.split(b"\r\n") if l.lower().startswith(b"location")]
        out.append(f"{t:40} {status_of(raw)} loc={loc} up={[r.raw_path for r in upstream.received]} evil={hits}")
    upstream.received.clear()
    await gw.get("/x", headers={"Connection": "keep-alive, X-Custom", "X-Custom": "1", "Keep-Alive": "timeout=5", "TE": "trailers", "Trailer": "X-T", "Proxy-Authorization": "Basic x", "Upgrade": "h2c"})
    out.append(repr(upstream.last.headers))
    open("/tmp/probe/out2.txt", "a").write("\n".join(out) + "\n=====\n")
    await evil.close()
