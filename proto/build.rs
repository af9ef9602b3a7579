//! Generates the server stubs that the googleapis crates (client-only) do not ship: the Remote
//! Workers API's Bots service, over that crate's own message types. No `.proto` is copied.

fn main() {
    const RW: &str = "googleapis_tonic_google_devtools_remoteworkers_v1test2::google::devtools::remoteworkers::v1test2";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{RW}::{input}"))
            .output_type(format!("{RW}::{output}"))
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let bots = tonic_build::manual::Service::builder()
        .name("Bots")
        .package("google.devtools.remoteworkers.v1test2")
        .method(method("create_bot_session", "CreateBotSession", "CreateBotSessionRequest", "BotSession"))
        .method(method("update_bot_session", "UpdateBotSession", "UpdateBotSessionRequest", "BotSession"))
        .build();
    tonic_build::manual::Builder::new().build_client(false).build_server(true).compile(&[bots]);

    // The Build Event Service, over the build crate's message types.
    const BES: &str = "googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1";
    let bes = tonic_build::manual::Service::builder()
        .name("PublishBuildEvent")
        .package("google.devtools.build.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("publish_lifecycle_event")
                .route_name("PublishLifecycleEvent")
                .input_type(format!("{BES}::PublishLifecycleEventRequest"))
                .output_type("crate::Empty")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("publish_build_tool_event_stream")
                .route_name("PublishBuildToolEventStream")
                .input_type(format!("{BES}::PublishBuildToolEventStreamRequest"))
                .output_type(format!("{BES}::PublishBuildToolEventStreamResponse"))
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().build_client(false).build_server(true).compile(&[bes]);

    // The Completed Action Logger: Kiln is its client; the server half serves tests and tools.
    let cal = tonic_build::manual::Service::builder()
        .name("CompletedActionLogger")
        .package("buildbarn.completedactionlogger")
        .method(
            tonic_build::manual::Method::builder()
                .name("log_completed_actions")
                .route_name("LogCompletedActions")
                .input_type("crate::completed_actions::CompletedAction")
                .output_type("crate::Empty")
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().build_client(true).build_server(true).compile(&[cal]);

    // google.bytestream.ByteStream's server over the REAPI crate's messages, except that a
    // Write's requests decode into `crate::bytestream_server::WriteRequest`, whose `data` is a
    // slice of the buffer the message arrived in rather than a copy of it.
    const BS: &str = "bazel_remote_apis::google::bytestream";
    let bytestream = tonic_build::manual::Service::builder()
        .name("ByteStream")
        .package("google.bytestream")
        .method(
            tonic_build::manual::Method::builder()
                .name("read")
                .route_name("Read")
                .input_type(format!("{BS}::ReadRequest"))
                .output_type(format!("{BS}::ReadResponse"))
                .codec_path("tonic_prost::ProstCodec")
                .server_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("write")
                .route_name("Write")
                .input_type("crate::bytestream_server::WriteRequest")
                .output_type(format!("{BS}::WriteResponse"))
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("query_write_status")
                .route_name("QueryWriteStatus")
                .input_type(format!("{BS}::QueryWriteStatusRequest"))
                .output_type(format!("{BS}::QueryWriteStatusResponse"))
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().build_client(false).build_server(true).compile(&[bytestream]);

    // Kiln's own protocols, compiled without a protoc binary.
    let protos = ["kiln/peer/v1/peer.proto", "kiln/events/v1/events.proto"];
    let fds = protox::compile(protos, ["."]).expect("Kiln's .proto files compile");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    tonic_prost_build::configure()
        // A blob chunk passed between nodes shares the buffer it was received into.
        .bytes(".kiln.peer.v1.BlobChunk.data")
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_fds(fds)
        .expect("generating Kiln's protocol code");
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
