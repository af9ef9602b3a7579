//! The Build Event Service and the query API on a real node (gRPC on loopback, sled on disk):
//! events are acknowledged in order once stored, resends are acknowledged again and stored once,
//! gaps and bad input are refused with a clear status, and acknowledged events survive a restart.

mod common;

use common::bes::*;
use common::*;
use kiln_proto::bes::publish_build_event_client::PublishBuildEventClient;
use kiln_proto::bes::{build_event, OrderedBuildEvent};
use kiln_proto::events::build_events_client::BuildEventsClient;
use kiln_proto::events::{GetStreamRequest, ListStreamsRequest, ReadEventsRequest};
use prost::Message;

fn payload(seq: i64) -> Vec<u8> {
    format!("event number {seq}").into_bytes()
}

fn stored_payload(e: &kiln_proto::events::Event) -> Vec<u8> {
    let o = OrderedBuildEvent::decode(&e.ordered_build_event[..]).unwrap();
    match o.event.unwrap().event.unwrap() {
        build_event::Event::BazelEvent(a) => a.value,
        other => format!("{other:?}").into_bytes(),
    }
}

#[tokio::test]
async fn a_tool_stream_is_acknowledged_in_order_indexed_and_read_back_complete() {
    let node = TestNode::start().await;
    let id = stream("build-1", "inv-1", TOOL);
    let reqs: Vec<_> = (1..=20).map(|s| tool_event(&id, s, &payload(s), s == 20)).collect();
    let (acks, end) = publish(&node.channel, reqs).await;
    end.unwrap();
    assert_eq!(acks, (1..=20).collect::<Vec<_>>());

    let mut q = BuildEventsClient::new(node.channel.clone());
    let s = q.get_stream(GetStreamRequest { stream_id: "build-1.3.inv-1".into() }).await.unwrap().into_inner();
    assert_eq!((s.build_id.as_str(), s.invocation_id.as_str(), s.component.as_str()), ("build-1", "inv-1", "TOOL"));
    assert_eq!((s.event_count, s.finished), (20, true));
    assert_eq!(s.first_event_time.unwrap().seconds, 1_700_000_001);
    assert_eq!(s.last_event_time.unwrap().seconds, 1_700_000_020);

    let events = read_all(&node.channel, "build-1.3.inv-1").await.unwrap();
    assert_eq!(events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    assert_eq!(stored_payload(&events[6]), payload(7));
    assert_eq!(events[0].kind, "bazel_event");
    assert_eq!(events[19].kind, "component_stream_finished");
}

#[tokio::test]
async fn a_resent_event_is_acknowledged_again_and_stored_once_and_a_gap_is_refused() {
    let node = TestNode::start().await;
    let id = stream("build-2", "inv-2", TOOL);
    let (acks, end) = publish(&node.channel, (1..=5).map(|s| tool_event(&id, s, &payload(s), false)).collect()).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3, 4, 5]);
    // The client lost acks 3-5 and reconnects: it resends from 3 (with other bytes, to tell the copies apart).
    let again = (3..=8).map(|s| tool_event(&id, s, &if s <= 5 { b"resent".to_vec() } else { payload(s) }, s == 8)).collect();
    let (acks, end) = publish(&node.channel, again).await;
    end.unwrap();
    assert_eq!(acks, vec![3, 4, 5, 6, 7, 8]);
    let events = read_all(&node.channel, "build-2.3.inv-2").await.unwrap();
    assert_eq!(events.len(), 8, "each sequence number once");
    assert_eq!(stored_payload(&events[3]), payload(4), "the first copy stays");

    // A gap: 10 after 8.
    let id3 = stream("build-3", "inv-3", TOOL);
    let (acks, end) = publish(&node.channel, vec![tool_event(&id3, 1, b"a", false), tool_event(&id3, 3, b"c", false)]).await;
    assert_eq!(acks, vec![1], "what came before the gap is acknowledged");
    let st = end.unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("expected 2") && st.message().contains("build-3.3.inv-3"), "{}", st.message());
    // A stream must start at 1.
    let (acks, end) = publish(&node.channel, vec![tool_event(&stream("build-4", "i", TOOL), 2, b"b", false)]).await;
    assert!(acks.is_empty());
    assert_eq!(end.unwrap_err().code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn lifecycle_events_form_their_own_streams_and_finish_them() {
    let node = TestNode::start().await;
    let mut c = PublishBuildEventClient::new(node.channel.clone());
    let build = stream("build-5", "", CONTROLLER);
    let inv = stream("build-5", "inv-5", CONTROLLER);
    c.publish_lifecycle_event(lifecycle(&build, 1, build_event::Event::BuildEnqueued(Default::default()))).await.unwrap();
    c.publish_lifecycle_event(lifecycle(&inv, 1, build_event::Event::InvocationAttemptStarted(Default::default()))).await.unwrap();
    // A retried lifecycle call is acknowledged again.
    c.publish_lifecycle_event(lifecycle(&inv, 1, build_event::Event::InvocationAttemptStarted(Default::default()))).await.unwrap();
    c.publish_lifecycle_event(lifecycle(&inv, 2, build_event::Event::InvocationAttemptFinished(Default::default()))).await.unwrap();

    let mut q = BuildEventsClient::new(node.channel.clone());
    let listed = q.list_streams(ListStreamsRequest { pattern: "^build-5\\.".into(), ..Default::default() }).await.unwrap().into_inner();
    let got: Vec<_> = listed.streams.iter().map(|s| (s.stream_id.as_str(), s.event_count, s.finished)).collect();
    assert_eq!(got, vec![("build-5.1.", 1, false), ("build-5.1.inv-5", 2, true)]);
    c.publish_lifecycle_event(lifecycle(&build, 2, build_event::Event::BuildFinished(Default::default()))).await.unwrap();
    assert!(q.get_stream(GetStreamRequest { stream_id: "build-5.1.".into() }).await.unwrap().into_inner().finished);
    let st = c
        .publish_lifecycle_event(lifecycle(&build, 4, build_event::Event::BuildFinished(Default::default())))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn streams_are_listed_by_regex_with_paging() {
    let node = TestNode::start().await;
    for b in 0..7 {
        let id = stream(&format!("b{b}"), "inv", TOOL);
        let (_, end) = publish(&node.channel, vec![tool_event(&id, 1, b"x", true)]).await;
        end.unwrap();
    }
    let mut q = BuildEventsClient::new(node.channel.clone());
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = q
            .list_streams(ListStreamsRequest { pattern: "^b[0-5]\\.3\\.".into(), page_size: 2, page_token: token })
            .await
            .unwrap()
            .into_inner();
        assert!(page.streams.len() <= 2);
        seen.extend(page.streams.into_iter().map(|s| s.stream_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..6).map(|b| format!("b{b}.3.inv")).collect::<Vec<_>>());
    let all = q.list_streams(ListStreamsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.streams.len(), 7);
}

#[tokio::test]
async fn bad_input_gets_a_clear_status() {
    let node = TestNode::start_with(|c| c.build_events.max_event_bytes = 4096).await;
    let mut q = BuildEventsClient::new(node.channel.clone());
    let nf = q.get_stream(GetStreamRequest { stream_id: "no-such.3.stream".into() }).await.unwrap_err();
    assert_eq!(nf.code(), tonic::Code::NotFound);
    assert!(nf.message().contains("no-such.3.stream"), "{}", nf.message());
    let nf = q.read_events(ReadEventsRequest { stream_id: "no-such.3.stream".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(nf.code(), tonic::Code::NotFound);
    let bad = q.list_streams(ListStreamsRequest { pattern: "(unclosed".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("(unclosed"), "{}", bad.message());

    let cases = [
        (tool_event(&stream("ok", "inv", TOOL), 1, &vec![7u8; 8192], false), "build_events.max_event_bytes"),
        (tool_event(&stream("", "inv", TOOL), 1, b"x", false), "build_id is empty"),
        (tool_event(&stream("bad/id", "inv", TOOL), 1, b"x", false), "build_id \"bad/id\""),
        (tool_event(&stream("b", "inv.x", TOOL), 1, b"x", false), "invocation_id"),
        (tool_event(&stream("b", "inv", 0), 1, b"x", false), "component 0"),
        (tool_event(&stream("b", "inv", 9), 1, b"x", false), "component 9"),
        (tool_event(&stream("b", "inv", TOOL), 0, b"x", false), "sequence_number 0"),
        (kiln_proto::bes::PublishBuildToolEventStreamRequest::default(), "ordered_build_event is missing"),
    ];
    for (req, want) in cases {
        let (acks, end) = publish(&node.channel, vec![req]).await;
        assert!(acks.is_empty());
        let st = end.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{want}: {st:?}");
        assert!(st.message().contains(want), "{want:?} not in {:?}", st.message());
    }
    // Two streams on one call.
    let (acks, end) =
        publish(&node.channel, vec![tool_event(&stream("s1", "i", TOOL), 1, b"x", false), tool_event(&stream("s2", "i", TOOL), 1, b"x", false)]).await;
    assert_eq!(acks, Vec::<i64>::new());
    assert_eq!(end.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut c = PublishBuildEventClient::new(node.channel.clone());
    let st = c.publish_lifecycle_event(kiln_proto::bes::PublishLifecycleEventRequest::default()).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    // The node still serves.
    let (acks, end) = publish(&node.channel, vec![tool_event(&stream("after", "i", TOOL), 1, b"x", true)]).await;
    end.unwrap();
    assert_eq!(acks, vec![1]);
}

#[tokio::test]
async fn acknowledged_events_and_the_index_survive_a_restart() {
    let node = TestNode::start().await;
    let id = stream("build-r", "inv-r", TOOL);
    let (acks, end) = publish(&node.channel, (1..=6).map(|s| tool_event(&id, s, &payload(s), false)).collect()).await;
    end.unwrap();
    assert_eq!(acks.len(), 6);
    let dir = node.stop().await;
    let node = TestNode::restart(dir).await;
    let events = read_all(&node.channel, "build-r.3.inv-r").await.unwrap();
    assert_eq!(events.len(), 6);
    assert_eq!(stored_payload(&events[5]), payload(6));
    // The stream goes on where it stopped.
    let (acks, end) = publish(&node.channel, vec![tool_event(&id, 6, b"again", false), tool_event(&id, 7, b"", true)]).await;
    end.unwrap();
    assert_eq!(acks, vec![6, 7]);
    let s = BuildEventsClient::new(node.channel.clone())
        .get_stream(GetStreamRequest { stream_id: "build-r.3.inv-r".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.event_count, s.finished), (7, true));
}
