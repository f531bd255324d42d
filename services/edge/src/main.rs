fn main() -> anyhow::Result<()> {
    socle_edge::main()
}
